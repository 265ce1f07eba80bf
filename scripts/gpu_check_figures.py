"""Two steps of the GPU check that read rather than run (scripts/gpu_check.py calls them).

    python scripts/gpu_check_figures.py env --target DIR --json OUT
        imports every carried package and says where it came from (it must be DIR: a package of the
        machine's own would hide a missing wheel), with the versions of torch, transformers and the
        device; exits 1 when an import fails or comes from elsewhere.
    python scripts/gpu_check_figures.py kd --run-dir DIR --teacher DIR --heldout FILE --json OUT
        the general-distillation run's figures: losses and tokens/s from its TensorBoard scalars,
        and its exported student's agreement with the teacher on held-out sentences.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_check import CARRIED_MODULES


def env_facts(target: Path) -> tuple[dict, list[str]]:
    """Versions and origins of the carried packages, torch, transformers and the device; problems."""
    import torch
    import transformers

    facts: dict = {"python": platform.python_version(), "torch": torch.__version__,
                   "transformers": transformers.__version__, "cuda_available": torch.cuda.is_available(),
                   "packages": {}}
    problems = []
    for name in CARRIED_MODULES:
        try:
            module = importlib.import_module(name)
        except Exception as error:  # noqa: BLE001 - any import failure is what this step reports
            problems.append(f"import {name}: {type(error).__name__}: {error}")
            continue
        origin = Path(module.__file__).resolve()
        facts["packages"][name] = {"version": getattr(module, "__version__", None), "file": str(origin)}
        if not origin.is_relative_to(target.resolve()):
            problems.append(f"{name} was imported from {origin}, not from the wheels in {target}")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        facts.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                     multiprocessors=props.multi_processor_count, capability=list(torch.cuda.get_device_capability(0)),
                     bf16_supported=torch.cuda.is_bf16_supported(), cuda=torch.version.cuda)
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
                              "--format=csv,noheader"], capture_output=True, text=True, check=False)
        facts["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    facts["problems"] = problems
    return facts, problems


def kd_figures(run_dir: Path, teacher: str, heldout: Path, limit: int) -> dict:
    """Loss at the first and last logged step, tokens/s per logging window (the median leaves out the
    first window, which holds the warm-up), and the exported student's agreement report."""
    from mlkd_scale.data.corpus.local_corpus import heldout_sentences
    from mlkd_scale.engine.trackers import read_scalars
    from mlkd_scale.eval.agreement import agreement_report

    if not (run_dir / "tensorboard").is_dir():
        raise SystemExit(f"no {run_dir / 'tensorboard'}: the general_kd step wrote nothing (see its log)")
    scalars = read_scalars(run_dir / "tensorboard")
    loss = scalars.get("loss/total", [])
    rates = [value for _, value in scalars.get("throughput/tokens_per_s", [])]
    steady = rates[1:] or rates
    figures = {
        "steps": loss[-1][0] if loss else 0,
        "first_loss": loss[0][1] if loss else None,
        "last_loss": loss[-1][1] if loss else None,
        "loss_curve": loss,
        "tokens_per_s_windows": rates,
        "tokens_per_s_median": statistics.median(steady) if steady else None,
        "samples_per_s_median": statistics.median([v for _, v in scalars.get("throughput/samples_per_s", [])][1:]
                                                  or [float("nan")]),
    }
    student = run_dir / "student"
    if (student / "config.json").exists():
        report = agreement_report(teacher, str(student), heldout_sentences(str(heldout), limit=limit))
        figures["agreement"] = report
        figures["agreement_trained"] = report["trained"]
        figures["agreement_margin"] = report["margin"]
    return figures


def main(argv: list[str] | None = None) -> int:
    """``env`` or ``kd``; writes the JSON named by ``--json``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    env = sub.add_parser("env")
    env.add_argument("--target", type=Path, required=True)
    env.add_argument("--json", type=Path, required=True)
    kd = sub.add_parser("kd")
    kd.add_argument("--run-dir", type=Path, required=True)
    kd.add_argument("--teacher", required=True)
    kd.add_argument("--heldout", type=Path, required=True)
    kd.add_argument("--limit", type=int, default=400, help="held-out sentences for the agreement")
    kd.add_argument("--json", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "env":
        facts, problems = env_facts(args.target)
        args.json.write_text(json.dumps(facts, indent=2))
        print(json.dumps(facts, indent=2))
        return 1 if problems else 0
    figures = kd_figures(args.run_dir, args.teacher, args.heldout, args.limit)
    args.json.write_text(json.dumps(figures, indent=2))
    print(json.dumps({k: v for k, v in figures.items() if k != "loss_curve"}, indent=2))
    return 0 if figures["steps"] and "agreement" in figures else 1


if __name__ == "__main__":
    sys.exit(main())
