"""Teacher fine-tuning: ``deepspeed launchers/finetune_teacher.py --spec teacher.json``.

Fine-tunes the pre-trained encoder ``teacher.path`` with a fresh classification head on the spec's
GLUE task, or a question-answering head on SQuAD v1.1/v2.0 (budget ``task.finetune``) and exports the best checkpoint on dev to
``<output_dir>/teacher``, the ``teacher.path`` of a task-distillation spec. Also runs under
``torchrun`` and as plain ``python``. Relaunching the same command resumes.
"""

import sys

from mlkd_scale.engine.task.finetune import run_finetune
from mlkd_scale.launch import launch

if __name__ == "__main__":
    sys.exit(launch(run_finetune, __doc__, "checkpoint and exit after this optimizer step; the run stays "
                                           "resumable (time-boxed jobs)"))
