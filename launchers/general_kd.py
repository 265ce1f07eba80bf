"""General distillation: ``deepspeed launchers/general_kd.py --spec run.json``.

Also runs under ``torchrun`` and as plain ``python`` (one process). Thin on purpose: parse the
arguments, load the spec, hand over to the engine.
"""

import sys

from mlkd_scale.engine.general_kd import Trainer
from mlkd_scale.launch import launch


def run(spec, stop_after_steps=None):
    return Trainer(spec, stop_after_steps=stop_after_steps).train()


if __name__ == "__main__":
    sys.exit(launch(run, __doc__, "checkpoint and exit after this optimizer step; the run stays resumable "
                                  "(time-boxed jobs)"))
