"""Head-count study (paper §4, §7.1): student inference time for several attention-head counts, in
PyTorch and, deployed, in onnxruntime.

The same weights are loaded into one model per head count (``heads_models.py``: changing
``num_attention_heads`` changes no weight shape in BERT), and each is also exported to ONNX and run
by onnxruntime (``latency_runtimes.py``: the graph ``mlkd-scale export --onnx`` writes). For each
(batch, seq) cell all of them are timed side by side in one run: warm-up, then interleaved rounds
(round-robin over runtimes and head counts, the starting model rotating each round), median per
model, so machine noise hits all of them alike (``heads_timing.py``).

Before timing, the script checks numerically that the head split matters: the models have identical
parameter counts and identical weights, give finite outputs, and give pairwise *different* outputs
(compared in fp32, where rounding cannot hide the difference); each ONNX graph must match its
PyTorch model within the export's tolerance, closer than any two head counts are to each other.

    .venv/bin/python benchmarks/inference_heads.py                    # 4L-312-1200 student, CPU (*)
    .venv/bin/python benchmarks/inference_heads.py --quick            # 3 head counts, 25 s budget
    .venv/bin/python benchmarks/inference_heads.py --model outputs/export/student --heads 12 3
    .venv/bin/python benchmarks/inference_heads.py --runtimes torch --device cuda --dtype bf16 --attn eager

Outputs in ``--out`` (default ``outputs/inference_heads/``, ``heads_report.py``): ``inference_heads.md``
(device facts, settings and the tables), ``inference_heads.csv`` and ``inference_heads.png`` (time
reduction vs batch size, one line per head count and runtime, one panel per sequence length; below,
onnxruntime's speed-up over PyTorch). The reduction of ``h`` heads is ``(t_base − t_h) / t_base``
in %, ``t_base`` being the 12-head time (``--baseline``) on the same runtime; positive means faster.

Without ``--model`` the weights are random (seeded): only shapes matter for time. The rounds of a
cell are chosen from a time budget (``--budget-s`` spread evenly over the cells, at least
``--rounds``, at most ``--max-rounds``); a call shorter than ``--min-measure-ms`` is repeated
inside one measurement (the same count for every model of the cell). onnxruntime runs the fp32
graph on the CPU with as many intra-op threads as torch (``--threads``); the ONNX exports (about
10 s per head count on 2 idle cores) are not part of the budget. (*) The full run took 432 s with
``--threads 1`` on a 2-core VM at load average 8-11, 162 s of it the six exports.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from heads_models import (
    BertModel,
    Sanity,
    Student,
    build_variant,
    forward,
    load_student,
    make_inputs,
    param_count,
    random_student,
    sanity_check,
    student_config,
    usable_heads,
)
from heads_report import (
    FILE_STEM,
    markdown_report,
    markdown_table,
    speedup_table,
    write_csv,
    write_outputs,
    write_plot,
)
from heads_timing import Cell, Key, Timer, device_facts, make_wall_timer, reduction_pct, time_cell
from latency_runtimes import RUNTIMES, OnnxVariants, export_variants, onnx_call

__all__ = [
    "FILE_STEM", "BertModel", "Cell", "Sanity", "Student", "Timer", "build_variant", "device_facts",
    "forward", "load_student", "make_inputs", "make_wall_timer", "markdown_report", "markdown_table",
    "param_count", "random_student", "reduction_pct", "sanity_check", "speedup_table", "student_config",
    "time_cell", "usable_heads", "write_csv", "write_outputs", "write_plot",
]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_HEADS = (12, 6, 4, 3, 2, 1)
DEFAULT_BATCHES = (1, 8, 64)
DEFAULT_SEQS = (128,)
QUICK = {"heads": (12, 6, 3), "batches": (1, 8), "seqs": (128,), "rounds": 3, "budget_s": 25.0}
FULL = {
    "heads": DEFAULT_HEADS, "batches": DEFAULT_BATCHES, "seqs": DEFAULT_SEQS, "rounds": 3, "budget_s": 150.0
}


@dataclass
class StudySettings:
    """What to time and how; ``runtimes`` is PyTorch alone unless onnxruntime is asked for (the CLI
    asks for both), since onnxruntime is an optional extra."""

    heads: list[int] = field(default_factory=lambda: list(DEFAULT_HEADS))
    batches: list[int] = field(default_factory=lambda: list(DEFAULT_BATCHES))
    seqs: list[int] = field(default_factory=lambda: list(DEFAULT_SEQS))
    runtimes: list[str] = field(default_factory=lambda: ["torch"])
    device: str = "cpu"
    dtype: str = "fp32"
    attn: str = "sdpa"
    baseline: int = 12
    warmup: int = 1
    rounds: int = 3
    max_rounds: int = 25
    budget_s: float = 150.0
    min_measure_ms: float = 40.0
    seed: int = 0


@dataclass
class StudyResult:
    """Everything the outputs show: the settings, the models, the checks and every cell's timings."""

    settings: StudySettings
    source: str
    heads: list[int]
    dropped_heads: list[int]
    baseline: int
    sanity: Sanity
    cells: list[Cell]
    device_facts: list[str]
    seconds: float
    runtimes: list[str] = field(default_factory=lambda: ["torch"])
    onnx_check: dict[int, float] | None = None

    def reduction(self, cell: Cell, h: int, runtime: str = "torch") -> float:
        """Time reduction of ``h`` heads vs the baseline on ``runtime``, in % (positive = faster)."""
        return reduction_pct(cell.ms(self.baseline, runtime), cell.ms(h, runtime))


def _study_heads(student: Student, settings: StudySettings, log: Callable[[str], None]):
    """The usable head counts with the baseline first, the dropped ones, and the baseline."""
    heads, dropped = usable_heads(settings.heads, student.config.hidden_size)
    if not heads:
        raise ValueError(
            f"none of the head counts {settings.heads} divides the width {student.config.hidden_size}"
        )
    if dropped:
        log(f"skipping head counts that do not divide the width {student.config.hidden_size}: {dropped}")
    baseline = settings.baseline if settings.baseline in heads else max(heads)
    if baseline != settings.baseline:
        log(f"baseline {settings.baseline} heads is not in the study; using {baseline} heads instead")
    return [baseline] + [h for h in heads if h != baseline], dropped, baseline


def _check_runtimes(settings: StudySettings) -> None:
    unknown = [r for r in settings.runtimes if r not in RUNTIMES]
    if unknown or not settings.runtimes:
        raise ValueError(f"runtimes must be some of {RUNTIMES}, got {settings.runtimes}")
    if "onnxruntime" in settings.runtimes and (settings.device != "cpu" or settings.dtype != "fp32"):
        raise ValueError("onnxruntime runs the fp32 ONNX graph on the CPU: use device cpu and dtype fp32")


def _warn_if_loaded(settings: StudySettings, log: Callable[[str], None]) -> None:
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    threads = torch.get_num_threads()
    if not settings.device.startswith("cuda") and threads > 1 and busy >= (os.cpu_count() or 1):
        log(
            f"warning: load average {busy:.1f} >= {os.cpu_count()} CPUs with {threads} torch threads: "
            "multi-threaded kernels stall when their threads are descheduled; "
            "--threads 1 gives steadier numbers"
        )


def _checked_models(student: Student, settings: StudySettings, heads: list[int], log: Callable[[str], None]):
    """The PyTorch variants, after :func:`sanity_check`; and the onnxruntime ones if asked for,
    each closer to its PyTorch model than any two head counts are to each other."""
    dtype = DTYPES[settings.dtype]
    models = {h: build_variant(student, h, settings.attn, settings.device, dtype) for h in heads}
    sanity = sanity_check(student, models, settings.attn, settings.device, dtype)
    count = next(iter(sanity.param_counts.values()))
    pair = f" (closest: {sanity.min_pair[0]} vs {sanity.min_pair[1]} heads)" if sanity.min_pair else ""
    log(
        f"sanity: {len(heads)} head counts, all {count:,} parameters and identical weights, finite outputs; "
        f"smallest max |output diff| between head counts {sanity.min_pair_diff:.3g}{pair} "
        f"> tolerance {sanity.tolerance:.1e} (fp32 sdpa-vs-eager noise {sanity.noise:.1e})"
    )
    onnx = None
    if "onnxruntime" in settings.runtimes:
        onnx = export_variants(student, heads, settings.attn, torch.get_num_threads(), log)
        worst = max(onnx.max_abs_diff.values())
        if sanity.min_pair is not None and not worst < sanity.min_pair_diff:
            onnx.close()
            raise RuntimeError(
                f"an ONNX graph differs from its PyTorch model by {worst:.2e}, not less than two head counts "
                f"differ ({sanity.min_pair_diff:.2e}): the timings would not compare head counts"
            )
    return models, sanity, onnx


def _time_cells(
    models: dict[int, torch.nn.Module],
    onnx: OnnxVariants | None,
    student: Student,
    settings: StudySettings,
    heads: list[int],
    timer: Timer,
    log: Callable[[str], None],
) -> list[Cell]:
    """Every (batch, seq) cell, every runtime and head count of it timed side by side."""
    n_cells = len(settings.batches) * len(settings.seqs)
    cells = []
    for seq in settings.seqs:
        for batch in settings.batches:
            inputs = make_inputs(batch, seq, student.config.vocab_size, settings.device, seed=settings.seed)
            calls: dict[Key, Callable[[], object]] = {}
            for runtime in settings.runtimes:
                for h in heads:
                    if runtime == "torch":
                        calls[(runtime, h)] = lambda m=models[h], x=inputs: forward(m, x)
                    else:
                        calls[(runtime, h)] = onnx_call(onnx.sessions[h], inputs)
            cell = time_cell(
                calls, batch=batch, seq=seq, timer=timer, device=settings.device, warmup=settings.warmup,
                min_rounds=settings.rounds, max_rounds=settings.max_rounds, budget_s=settings.budget_s / n_cells,
                min_measure_s=settings.min_measure_ms / 1000.0,
            )
            cells.append(cell)
            for runtime in settings.runtimes:
                base = cell.ms(heads[0], runtime)
                summary = ", ".join(
                    f"{h}h {cell.ms(h, runtime):.1f} ms ({reduction_pct(base, cell.ms(h, runtime)):+.1f}%)"
                    for h in heads[1:]
                )
                log(
                    f"batch {batch:>3} seq {seq:>4} {runtime:>11}: {heads[0]}h {base:.1f} ms; {summary} "
                    f"[{cell.rounds} rounds x {cell.number} calls]"
                )
    return cells


def run_study(
    student: Student,
    settings: StudySettings,
    timer: Timer | None = None,
    log: Callable[[str], None] = print,
) -> StudyResult:
    """Build one variant per usable head count (and runtime) from ``student``, check them, time
    every cell."""
    started = time.perf_counter()
    _check_runtimes(settings)
    heads, dropped, baseline = _study_heads(student, settings, log)
    facts = device_facts(settings.device, settings.runtimes)
    for line in facts:
        log(line)
    _warn_if_loaded(settings, log)
    models, sanity, onnx = _checked_models(student, settings, heads, log)
    try:
        cells = _time_cells(models, onnx, student, settings, heads, timer or make_wall_timer(settings.device), log)
    finally:
        if onnx is not None:
            onnx.close()
    return StudyResult(
        settings, student.source, heads, dropped, baseline, sanity, cells, facts,
        time.perf_counter() - started, runtimes=list(settings.runtimes),
        onnx_check=dict(onnx.max_abs_diff) if onnx is not None else None,
    )


# ---------------------------------------------------------------------------------------------
# command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; unset lists come from the full or ``--quick`` preset."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="exported student directory (its heads are varied); default: random")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=312)
    p.add_argument("--ffn", type=int, default=1200)
    p.add_argument("--heads", type=int, nargs="+", help=f"default {' '.join(map(str, DEFAULT_HEADS))}")
    p.add_argument("--batches", type=int, nargs="+", help=f"default {' '.join(map(str, DEFAULT_BATCHES))}")
    p.add_argument("--seqs", type=int, nargs="+", help=f"default {' '.join(map(str, DEFAULT_SEQS))}")
    p.add_argument("--runtimes", nargs="+", choices=list(RUNTIMES), default=list(RUNTIMES),
                   help="PyTorch and/or onnxruntime (default both; onnxruntime: CPU, fp32)")
    p.add_argument("--baseline", type=int, default=12, help="head count the reductions are relative to")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa")
    p.add_argument("--rounds", type=int, help="minimum timed rounds per cell (default 3)")
    p.add_argument("--max-rounds", type=int, default=25)
    p.add_argument("--budget-s", type=float, help="timing budget for all cells (default 150, --quick 25)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up calls per model and cell")
    p.add_argument("--min-measure-ms", type=float, default=40.0, help="repeat shorter calls")
    p.add_argument("--threads", type=int, help="torch (and onnxruntime) intra-op threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="heads 12 6 3, batches 1 8: about two minutes")
    p.add_argument("--out", default="outputs/inference_heads/")
    args = p.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for name in ("heads", "batches", "seqs", "rounds", "budget_s"):
        if getattr(args, name) is None:
            setattr(args, name, preset[name])
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    if "onnxruntime" in args.runtimes:
        if args.device != "cpu" or args.dtype != "fp32":
            p.error("--runtimes onnxruntime runs the fp32 graph on the CPU: add --runtimes torch for "
                    f"--device {args.device} --dtype {args.dtype}")
        from mlkd_scale.engine.export.onnx_export import require_onnx
        from mlkd_scale.errors import ExportError

        try:
            require_onnx()
        except ExportError as exc:
            p.error(f"--runtimes onnxruntime: {exc}; or time PyTorch alone with --runtimes torch")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the study from the command line, print the table(s) and write the outputs."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model:
        student = load_student(args.model)
    else:
        student = random_student(student_config(args.layers, args.hidden, args.ffn), seed=args.seed)
    settings = StudySettings(
        heads=list(args.heads), batches=list(args.batches), seqs=list(args.seqs), runtimes=list(args.runtimes),
        device=args.device, dtype=args.dtype, attn=args.attn, baseline=args.baseline, warmup=args.warmup,
        rounds=args.rounds, max_rounds=max(args.max_rounds, args.rounds), budget_s=args.budget_s,
        min_measure_ms=args.min_measure_ms, seed=args.seed,
    )
    print(f"model: {student.source}")
    result = run_study(student, settings)
    paths = write_outputs(result, args.out)
    print()
    print(markdown_table(result))
    if speedup_table(result):
        print("\nspeed-up over PyTorch (t_torch / t_runtime):\n")
        print(speedup_table(result))
    print()
    print(f"total {result.seconds:.0f} s; wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
