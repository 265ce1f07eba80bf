"""Task distillation: ``deepspeed launchers/task_kd.py --spec task.json``.

Stage 1 then Stage 2 of MLKD-BERT on a GLUE task or SQuAD, from a fine-tuned task teacher (``teacher.path``)
into the student; exports the best student to ``<output_dir>/student``. Also runs under
``torchrun`` and as plain ``python`` (one process). Relaunching the same command resumes.
"""

import sys

from mlkd_scale.engine.task.distill import run_task_kd
from mlkd_scale.launch import launch

if __name__ == "__main__":
    sys.exit(launch(run_task_kd, __doc__, "checkpoint and exit after this run step (Stage-1 steps, then "
                                          "Stage-2 steps counted on from there: the TensorBoard x axis); "
                                          "the run stays resumable"))
