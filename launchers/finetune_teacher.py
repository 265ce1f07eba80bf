"""Teacher fine-tuning: ``deepspeed launchers/finetune_teacher.py --spec teacher.json``.

Fine-tunes the pre-trained encoder ``teacher.path`` with a fresh classification head on the spec's
GLUE task (budget ``task.finetune``) and exports the best checkpoint on dev to
``<output_dir>/teacher``, the ``teacher.path`` of a task-distillation spec. Also runs under
``torchrun`` and as plain ``python``. Relaunching the same command resumes.
"""

import argparse
import sys

from mlkd_scale.data.sources import DataError
from mlkd_scale.engine.checkpoint import CheckpointError
from mlkd_scale.engine.task_finetune import run_finetune
from mlkd_scale.spec import SpecError, load_spec


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--spec", required=True, help="run spec (.json or .yaml) with a task section")
    parser.add_argument(
        "--stop_after_steps",
        type=int,
        default=None,
        help="checkpoint and exit after this optimizer step; the run stays resumable (time-boxed jobs)",
    )
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by deepspeed
    args = parser.parse_args()
    try:
        run_finetune(load_spec(args.spec), stop_after_steps=args.stop_after_steps)
    except (SpecError, DataError, CheckpointError) as error:
        print(f"error in the run of {args.spec}:\n{error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
