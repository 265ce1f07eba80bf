"""Head-count study (paper §4, §7.1): student inference time for several attention-head counts.

Changing ``num_attention_heads`` changes no weight shape in BERT (Q, K, V and W^O are d×d whatever
the split), so one state dict is loaded into one model per head count: the models share every
weight and differ only in how the attention is split. For each (batch, seq) cell they are timed
side by side in one run: warm-up, then interleaved rounds (round-robin over the head counts, the
starting model rotating each round), median per model, so machine noise hits all of them alike.

Before timing, the script checks numerically that the head split matters: the models have identical
parameter counts and identical weights, give finite outputs, and give pairwise *different* outputs
(compared in fp32, where rounding cannot hide the difference).

    .venv/bin/python benchmarks/inference_heads.py                    # 4L-312-1200 student, CPU, ~5 min
    .venv/bin/python benchmarks/inference_heads.py --quick            # about one minute
    .venv/bin/python benchmarks/inference_heads.py --model outputs/export/student --heads 12 3
    .venv/bin/python benchmarks/inference_heads.py --device cuda --dtype bf16 --attn eager

Outputs in ``--out`` (default ``outputs/inference_heads/``): ``inference_heads.md`` (device facts,
settings and the table), ``inference_heads.csv`` and ``inference_heads.png`` (time reduction vs
batch size, one line per head count, one panel per sequence length). The reduction of ``h`` heads
is ``(t_base − t_h) / t_base`` in %, ``t_base`` being the 12-head time (``--baseline``); positive
means faster than the baseline.

Without ``--model`` the weights are random (seeded): only shapes matter for time. The rounds of a
cell are chosen from a time budget (``--budget-s`` spread evenly over the cells, at least
``--rounds``, at most ``--max-rounds``); a call shorter than ``--min-measure-ms`` is repeated
inside one measurement (the same count for every model of the cell).
"""

from __future__ import annotations

import argparse
import copy
import csv
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import transformers
from transformers import AutoConfig, BertConfig, BertModel, PretrainedConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_HEADS = (12, 6, 4, 3, 2, 1)
DEFAULT_BATCHES = (1, 8, 32, 64)
DEFAULT_SEQS = (64, 128)
QUICK = {"heads": (12, 6, 3), "batches": (1, 8, 32), "seqs": (64, 128), "rounds": 3, "budget_s": 25.0}
FULL = {
    "heads": DEFAULT_HEADS, "batches": DEFAULT_BATCHES, "seqs": DEFAULT_SEQS, "rounds": 3, "budget_s": 150.0
}
FILE_STEM = "inference_heads"


# ---------------------------------------------------------------------------------------------
# the student and its head-count variants


def student_config(
    layers: int = 4,
    hidden: int = 312,
    ffn: int = 1200,
    heads: int = 12,
    vocab: int = 30522,
    max_positions: int = 512,
) -> BertConfig:
    """A BERT config of the student's shape (default: MLKD-BERT4 / TinyBERT4, 4L-312-1200)."""
    return BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=ffn,
        max_position_embeddings=max_positions,
    )


@dataclass
class Student:
    """What every head-count variant is built from: a class, a config and one set of weights."""

    model_class: type
    config: PretrainedConfig
    state_dict: dict[str, torch.Tensor]
    source: str


def random_student(config: PretrainedConfig, seed: int = 0) -> Student:
    torch.manual_seed(seed)
    model = BertModel(config)
    shape = (
        f"random BertModel {config.num_hidden_layers}L-{config.hidden_size}-{config.intermediate_size} "
        f"(seed {seed})"
    )
    return Student(BertModel, config, model.state_dict(), shape)


def load_student(path: str) -> Student:
    """An exported student directory: its own class (from ``architectures``) and weights, in fp32."""
    config = AutoConfig.from_pretrained(path)
    arch = (config.architectures or [None])[0]
    model_class = getattr(transformers, arch, None) if arch else None
    if model_class is None:
        model_class = transformers.AutoModel._model_mapping[type(config)]
    model = model_class.from_pretrained(path, dtype=torch.float32)
    return Student(model_class, model.config, model.state_dict(), f"{path} ({model_class.__name__})")


def usable_heads(heads: list[int], hidden: int) -> tuple[list[int], list[int]]:
    """The head counts that divide the width (kept in the given order) and the ones dropped."""
    keep = [h for h in dict.fromkeys(heads) if h > 0 and hidden % h == 0]
    return keep, [h for h in heads if h not in keep]


def build_variant(
    student: Student, heads: int, attn: str, device: str, dtype: torch.dtype
) -> torch.nn.Module:
    """The student with ``heads`` attention heads and exactly the shared weights (strict load)."""
    config = copy.deepcopy(student.config)
    config.num_attention_heads = heads
    model = student.model_class(config)
    model.load_state_dict(student.state_dict, strict=True)
    model.set_attn_implementation(attn)
    if model.config._attn_implementation != attn:
        raise RuntimeError(f"asked for {attn} attention, the model uses {model.config._attn_implementation}")
    model.requires_grad_(False)
    return model.to(device=device, dtype=dtype).eval()


def make_inputs(batch: int, seq: int, vocab: int, device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    low = min(1000, vocab // 2)
    ids = torch.randint(low, vocab, (batch, seq), generator=g)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}


def forward(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.inference_mode():
        return model(**inputs)[0]


def param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# sanity: the head split matters, nothing else does


@dataclass
class Sanity:
    param_counts: dict[int, int]
    min_pair_diff: float  # smallest max-abs difference between two head counts' fp32 outputs
    min_pair: tuple[int, int] | None
    tolerance: float  # 20x the fp32 noise floor (sdpa vs eager, same heads), at least 1e-6 relative
    noise: float


def sanity_check(
    student: Student, models: dict[int, torch.nn.Module], attn: str, device: str, dtype: torch.dtype
) -> Sanity:
    """Raise unless the variants share their parameters, give finite outputs in ``dtype`` and
    pairwise different outputs in fp32 (built afresh when timing in another dtype)."""
    heads = list(models)
    counts = {h: param_count(m) for h, m in models.items()}
    if len(set(counts.values())) != 1:
        raise RuntimeError(f"head counts change the parameter count: {counts}")
    reference = models[heads[0]].state_dict()
    for h in heads[1:]:
        for name, tensor in models[h].state_dict().items():
            if not torch.equal(tensor, reference[name]):
                raise RuntimeError(f"the {h}-head model's {name} differs from the {heads[0]}-head model's")

    inputs = make_inputs(2, 16, student.config.vocab_size, device, seed=1)
    for h, model in models.items():
        out = forward(model, inputs)
        if not torch.isfinite(out).all():
            raise RuntimeError(f"the {h}-head model gives non-finite outputs in {dtype}")

    if dtype == torch.float32:
        fp32 = models
    else:
        fp32 = {h: build_variant(student, h, attn, device, torch.float32) for h in heads}
    outs = {h: forward(m, inputs).float() for h, m in fp32.items()}
    # Noise floor: the same head count through the other attention kernel (same maths, other
    # summation order). A real change of head split must stand well clear of it.
    other = "eager" if attn != "eager" else "sdpa"
    twin = forward(build_variant(student, heads[0], other, device, torch.float32), inputs).float()
    noise = (twin - outs[heads[0]]).abs().max().item()
    scale = max(out.abs().max().item() for out in outs.values())
    tolerance = max(20.0 * noise, 1e-6 * (1.0 + scale))
    min_diff, min_pair = math.inf, None
    for i, a in enumerate(heads):
        for b in heads[i + 1 :]:
            diff = (outs[a] - outs[b]).abs().max().item()
            if diff < min_diff:
                min_diff, min_pair = diff, (a, b)
    if min_pair is not None and not min_diff > tolerance:
        raise RuntimeError(
            f"the {min_pair[0]}- and {min_pair[1]}-head models give the same outputs "
            f"(max |diff| {min_diff:.2e} "
            f"<= {tolerance:.2e}): the head split is not taking effect"
        )
    return Sanity(counts, min_diff, min_pair, tolerance, noise)


# ---------------------------------------------------------------------------------------------
# timing


class Timer(Protocol):
    """Seconds per call of ``fn`` (which runs one forward), measured over ``number`` calls."""

    def __call__(
        self, fn: Callable[[], object], *, heads: int, batch: int, seq: int, number: int
    ) -> float: ...


def make_wall_timer(device: str) -> Timer:
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def timer(fn, *, heads, batch, seq, number):
        sync()
        start = time.perf_counter()
        for _ in range(number):
            fn()
        sync()
        return (time.perf_counter() - start) / number

    return timer


@dataclass
class Cell:
    batch: int
    seq: int
    rounds: int
    number: int
    times: dict[int, list[float]]  # seconds per call, one entry per round

    def ms(self, h: int) -> float:
        return 1000.0 * statistics.median(self.times[h])

    def spread_pct(self, h: int) -> float:
        """Interquartile range of the rounds relative to the median, in %."""
        values = self.times[h]
        if len(values) < 2:
            return 0.0
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
        return 100.0 * (q3 - q1) / statistics.median(values)


def reduction_pct(t_base: float, t_h: float) -> float:
    """Time reduction of a head count vs the baseline, in %: (t_base − t_h) / t_base."""
    return 100.0 * (t_base - t_h) / t_base


def time_cell(
    models: dict[int, torch.nn.Module],
    inputs: dict[str, torch.Tensor],
    *,
    batch: int,
    seq: int,
    timer: Timer,
    device: str,
    warmup: int,
    min_rounds: int,
    max_rounds: int,
    budget_s: float,
    min_measure_s: float,
) -> Cell:
    heads = list(models)
    calls = {h: (lambda m=models[h]: forward(m, inputs)) for h in heads}
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    warm: dict[int, float] = {}
    for _ in range(max(1, warmup)):  # interleaved too; the last pass's wall time calibrates the cell
        for h in heads:
            sync()
            start = time.perf_counter()
            calls[h]()
            sync()
            warm[h] = time.perf_counter() - start
    number = max(1, math.ceil(min_measure_s / max(min(warm.values()), 1e-9)))
    round_cost = number * sum(warm.values())
    rounds = max(min_rounds, min(max_rounds, int(budget_s // max(round_cost, 1e-9))))
    times: dict[int, list[float]] = {h: [] for h in heads}
    for r in range(rounds):
        shift = r % len(heads)
        for h in heads[shift:] + heads[:shift]:
            times[h].append(timer(calls[h], heads=h, batch=batch, seq=seq, number=number))
    return Cell(batch, seq, rounds, number, times)


# ---------------------------------------------------------------------------------------------
# the study


@dataclass
class StudySettings:
    heads: list[int] = field(default_factory=lambda: list(DEFAULT_HEADS))
    batches: list[int] = field(default_factory=lambda: list(DEFAULT_BATCHES))
    seqs: list[int] = field(default_factory=lambda: list(DEFAULT_SEQS))
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
    settings: StudySettings
    source: str
    heads: list[int]
    dropped_heads: list[int]
    baseline: int
    sanity: Sanity
    cells: list[Cell]
    device_facts: list[str]
    seconds: float

    def reduction(self, cell: Cell, h: int) -> float:
        return reduction_pct(cell.ms(self.baseline), cell.ms(h))


def device_facts(device: str) -> list[str]:
    facts = [
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"python {platform.python_version()}"
    ]
    if device.startswith("cuda"):
        index = torch.device(device).index or 0
        props = torch.cuda.get_device_properties(index)
        facts.append(f"GPU: {props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}")
    model_name = platform.processor() or "unknown CPU"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model_name = line.split(":", 1)[1].strip()
                break
    except (OSError, subprocess.SubprocessError):
        pass
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    facts.append(
        f"CPU: {model_name}; {os.cpu_count()} logical CPUs; torch threads {torch.get_num_threads()}; "
        f"load average (1/5/15 min) at start: {load}"
    )
    return facts


def run_study(
    student: Student,
    settings: StudySettings,
    timer: Timer | None = None,
    log: Callable[[str], None] = print,
) -> StudyResult:
    """Build one variant per usable head count from ``student``, check them, time every cell."""
    started = time.perf_counter()
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
    heads = [baseline] + [h for h in heads if h != baseline]
    facts = device_facts(settings.device)
    for line in facts:
        log(line)
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    threads = torch.get_num_threads()
    if not settings.device.startswith("cuda") and threads > 1 and busy >= (os.cpu_count() or 1):
        log(
            f"warning: load average {busy:.1f} >= {os.cpu_count()} CPUs with {threads} torch threads: "
            "multi-threaded kernels stall when their threads are descheduled; "
            "--threads 1 gives steadier numbers"
        )
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
    timer = timer or make_wall_timer(settings.device)
    n_cells = len(settings.batches) * len(settings.seqs)
    cells = []
    for seq in settings.seqs:
        for batch in settings.batches:
            inputs = make_inputs(batch, seq, student.config.vocab_size, settings.device, seed=settings.seed)
            cell = time_cell(
                models,
                inputs,
                batch=batch,
                seq=seq,
                timer=timer,
                device=settings.device,
                warmup=settings.warmup,
                min_rounds=settings.rounds,
                max_rounds=settings.max_rounds,
                budget_s=settings.budget_s / n_cells,
                min_measure_s=settings.min_measure_ms / 1000.0,
            )
            cells.append(cell)
            base = cell.ms(baseline)
            summary = ", ".join(
                f"{h}h {cell.ms(h):.1f} ms ({reduction_pct(base, cell.ms(h)):+.1f}%)" for h in heads[1:]
            )
            log(
                f"batch {batch:>3} seq {seq:>4}: {baseline}h {base:.1f} ms; {summary} "
                f"[{cell.rounds} rounds x {cell.number} calls]"
            )
    return StudyResult(
        settings, student.source, heads, dropped, baseline, sanity, cells, facts,
        time.perf_counter() - started,
    )


# ---------------------------------------------------------------------------------------------
# outputs


def _others(result: StudyResult) -> list[int]:
    return [h for h in result.heads if h != result.baseline]


def markdown_table(result: StudyResult) -> str:
    base, others = result.baseline, _others(result)
    header = ["batch", "seq"] + [f"{h}h ms" for h in result.heads] + [f"{h}h vs {base}h" for h in others]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    for cell in sorted(result.cells, key=lambda c: (c.batch, c.seq)):
        row = [str(cell.batch), str(cell.seq)]
        row += [f"{cell.ms(h):.2f}" for h in result.heads]
        row += [f"{result.reduction(cell, h):+.1f}%" for h in others]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def markdown_report(result: StudyResult) -> str:
    s = result.settings
    count = next(iter(result.sanity.param_counts.values()))
    lines = [
        "# Student inference time vs attention-head count",
        "",
        f"- model: {result.source}; {count:,} parameters for every head count",
        f"- device {s.device}, dtype {s.dtype}, attention {s.attn}, torch.inference_mode, eval()",
        *[f"- {fact}" for fact in result.device_facts],
        f"- timing: interleaved rounds (round-robin over head counts), median per model; "
        f"at least {s.rounds} rounds per cell, budget {s.budget_s:.0f} s; total {result.seconds:.0f} s",
        f"- columns: ms per batch (median); reduction vs {result.baseline} heads = "
        f"(t{result.baseline} − th) / t{result.baseline}, positive = faster",
    ]
    if result.dropped_heads:
        lines.append(f"- head counts skipped (do not divide the width): {result.dropped_heads}")
    return "\n".join(lines) + "\n\n" + markdown_table(result) + "\n"


def write_csv(result: StudyResult, path: Path) -> None:
    others = _others(result)
    header = ["batch", "seq", "rounds", "calls_per_measure"]
    header += [f"ms_{h}h" for h in result.heads]
    header += [f"reduction_pct_{h}h_vs_{result.baseline}h" for h in others]
    header += [f"iqr_pct_{h}h" for h in result.heads]
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for cell in sorted(result.cells, key=lambda c: (c.batch, c.seq)):
            row = [cell.batch, cell.seq, cell.rounds, cell.number]
            row += [f"{cell.ms(h):.4f}" for h in result.heads]
            row += [f"{result.reduction(cell, h):.3f}" for h in others]
            row += [f"{cell.spread_pct(h):.2f}" for h in result.heads]
            writer.writerow(row)


def write_plot(result: StudyResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seqs = sorted({c.seq for c in result.cells})
    fig, axes = plt.subplots(1, len(seqs), figsize=(5.2 * len(seqs), 4.0), sharey=True, squeeze=False)
    for ax, seq in zip(axes[0], seqs):
        cells = sorted((c for c in result.cells if c.seq == seq), key=lambda c: c.batch)
        batches = [c.batch for c in cells]
        for h in _others(result):
            ax.plot(batches, [result.reduction(c, h) for c in cells], marker="o", label=f"{h} heads")
        ax.axhline(0.0, color="grey", linewidth=0.8)
        if len(batches) > 1 and min(batches) > 0:
            ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set_title(f"seq {seq}")
        ax.set_xlabel("batch size")
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel(f"time reduction vs {result.baseline} heads (%)")
    axes[0][-1].legend(fontsize="small")
    s = result.settings
    fig.suptitle(f"{result.source}: {s.device} {s.dtype} {s.attn}", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(
    result: StudyResult, out_dir: str | Path, log: Callable[[str], None] = print
) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / f"{FILE_STEM}.md", "csv": out / f"{FILE_STEM}.csv", "png": out / f"{FILE_STEM}.png"}
    paths["md"].write_text(markdown_report(result))
    write_csv(result, paths["csv"])
    try:
        write_plot(result, paths["png"])
    except ImportError:
        log("matplotlib is not installed: no plot (pip install matplotlib)")
        del paths["png"]
    return paths


# ---------------------------------------------------------------------------------------------
# command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="exported student directory (its heads are varied); default: random")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=312)
    p.add_argument("--ffn", type=int, default=1200)
    p.add_argument("--heads", type=int, nargs="+", help=f"default {' '.join(map(str, DEFAULT_HEADS))}")
    p.add_argument("--batches", type=int, nargs="+", help=f"default {' '.join(map(str, DEFAULT_BATCHES))}")
    p.add_argument("--seqs", type=int, nargs="+", help=f"default {' '.join(map(str, DEFAULT_SEQS))}")
    p.add_argument("--baseline", type=int, default=12, help="head count the reductions are relative to")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa")
    p.add_argument("--rounds", type=int, help="minimum timed rounds per cell (default 3)")
    p.add_argument("--max-rounds", type=int, default=25)
    p.add_argument("--budget-s", type=float, help="timing budget for all cells (default 150, --quick 25)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up calls per model and cell")
    p.add_argument("--min-measure-ms", type=float, default=40.0, help="repeat shorter calls")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="heads 12 6 3, batches 1 8 32: about a minute")
    p.add_argument("--out", default="outputs/inference_heads/")
    args = p.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for name in ("heads", "batches", "seqs", "rounds", "budget_s"):
        if getattr(args, name) is None:
            setattr(args, name, preset[name])
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model:
        student = load_student(args.model)
    else:
        student = random_student(student_config(args.layers, args.hidden, args.ffn), seed=args.seed)
    settings = StudySettings(
        heads=list(args.heads),
        batches=list(args.batches),
        seqs=list(args.seqs),
        device=args.device,
        dtype=args.dtype,
        attn=args.attn,
        baseline=args.baseline,
        warmup=args.warmup,
        rounds=args.rounds,
        max_rounds=max(args.max_rounds, args.rounds),
        budget_s=args.budget_s,
        min_measure_ms=args.min_measure_ms,
        seed=args.seed,
    )
    print(f"model: {student.source}")
    result = run_study(student, settings)
    paths = write_outputs(result, args.out)
    print()
    print(markdown_table(result))
    print()
    print(f"total {result.seconds:.0f} s; wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
