"""What every launcher script shares: ``--spec``, ``--stop_after_steps``, one-message errors."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from mlkd_scale.engine.faults import RunStopped
from mlkd_scale.errors import CheckpointError, DataError
from mlkd_scale.spec import RunSpec, SpecError, load_spec


def launch(run: Callable[..., object], description: str, stop_help: str) -> int:
    """Parse the launcher arguments, load the spec and call ``run(spec, stop_after_steps=...)``.

    Works under the deepspeed launcher (which adds ``--local_rank``), torchrun and plain python.
    Bad input (spec, data, checkpoint) ends in one message on stderr and exit status 2; a run that
    stops on purpose (preemption, non-finite steps, a lost rank) in its message and status
    (:mod:`mlkd_scale.engine.faults`: 3, 4, 75, 76).
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--spec", required=True, help="run spec (.json or .yaml)")
    parser.add_argument("--stop_after_steps", type=int, default=None, help=stop_help)
    parser.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE", dest="overrides",
        help="change one spec field, e.g. --set train.lr=3e-4 (repeatable; VALUE parsed as JSON where it parses)",
    )
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by deepspeed
    args = parser.parse_args()
    try:
        spec: RunSpec = load_spec(args.spec, overrides=args.overrides)
        run(spec, stop_after_steps=args.stop_after_steps)
    except (SpecError, DataError, CheckpointError) as error:
        print(f"error in the run of {args.spec}:\n{error}", file=sys.stderr)
        return 2
    except RunStopped as stop:
        if stop.announce:
            print(stop.message, file=sys.stderr, flush=True)
        return stop.exit_code
    return 0
