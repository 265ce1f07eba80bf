"""General distillation: ``deepspeed launchers/general_kd.py --spec run.json``.

Also runs under ``torchrun`` and as plain ``python`` (one process). Thin on purpose: parse the
arguments, load the spec, hand over to the engine.
"""

import argparse
import sys

from mlkd_scale.data.sources import DataError
from mlkd_scale.engine.checkpoint import CheckpointError
from mlkd_scale.engine.trainer import Trainer
from mlkd_scale.spec import SpecError, load_spec


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--spec", required=True, help="run spec (.json or .yaml)")
    parser.add_argument(
        "--stop_after_steps",
        type=int,
        default=None,
        help="checkpoint and exit after this optimizer step; the run stays resumable (time-boxed jobs)",
    )
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by deepspeed
    args = parser.parse_args()
    try:
        Trainer(load_spec(args.spec), stop_after_steps=args.stop_after_steps).train()
    except (SpecError, DataError, CheckpointError) as error:
        print(f"error in the run of {args.spec}:\n{error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
