"""Task distillation: ``deepspeed launchers/task_kd.py --spec task.json``.

Stage 1 then Stage 2 of MLKD-BERT on a GLUE task, from a fine-tuned task teacher (``teacher.path``)
into the student; exports the best student to ``<output_dir>/student``. Also runs under
``torchrun`` and as plain ``python`` (one process). Relaunching the same command resumes.
"""

import argparse
import sys

from mlkd_scale.data.sources import DataError
from mlkd_scale.engine.checkpoint import CheckpointError
from mlkd_scale.engine.task_kd import run_task_kd
from mlkd_scale.spec import SpecError, load_spec


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--spec", required=True, help="run spec (.json or .yaml) with a task section")
    parser.add_argument(
        "--stop_after_steps",
        type=int,
        default=None,
        help="checkpoint and exit after this run step (Stage-1 steps, then Stage-2 steps, counted on from "
        "there: the TensorBoard x axis); the run stays resumable",
    )
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by deepspeed
    args = parser.parse_args()
    try:
        run_task_kd(load_spec(args.spec), stop_after_steps=args.stop_after_steps)
    except (SpecError, DataError, CheckpointError) as error:
        print(f"error in the run of {args.spec}:\n{error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
