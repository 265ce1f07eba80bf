"""Outputs of the head-count study (``inference_heads.py``): a markdown report with the table, a CSV
and a plot. With several runtimes (PyTorch and onnxruntime) the table has one row per runtime and
a second table gives onnxruntime's speed-up over PyTorch, t_torch / t_onnxruntime, per head count.

``result`` is the study's ``StudyResult``: ``heads`` (the baseline first), ``baseline``,
``runtimes``, ``cells`` (``heads_timing.Cell``), ``settings``, ``sanity``, ``device_facts``,
``onnx_check``, ``source``, ``seconds``, ``dropped_heads``.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

from heads_timing import reduction_pct

FILE_STEM = "inference_heads"


def others(result) -> list[int]:
    """The head counts other than the baseline, in the study's order."""
    return [h for h in result.heads if h != result.baseline]


def _rows(result):
    for cell in sorted(result.cells, key=lambda c: (c.batch, c.seq)):
        for runtime in result.runtimes:
            yield cell, runtime


def _reduction(result, cell, h: int, runtime: str) -> float:
    return reduction_pct(cell.ms(result.baseline, runtime), cell.ms(h, runtime))


def speedup(cell, h: int, runtime: str) -> float:
    """How many times faster ``runtime`` runs the ``h``-head model than PyTorch: t_torch / t_runtime."""
    return cell.ms(h, "torch") / cell.ms(h, runtime)


def _compared(result) -> list[str]:
    return [r for r in result.runtimes if r != "torch"] if "torch" in result.runtimes else []


def markdown_table(result) -> str:
    """ms per batch for every head count, and each head count's time reduction vs the baseline."""
    base, multi = result.baseline, len(result.runtimes) > 1
    header = ["batch", "seq"] + (["runtime"] if multi else []) + [f"{h}h ms" for h in result.heads]
    header += [f"{h}h vs {base}h" for h in others(result)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    for cell, runtime in _rows(result):
        row = [str(cell.batch), str(cell.seq)] + ([runtime] if multi else [])
        row += [f"{cell.ms(h, runtime):.2f}" for h in result.heads]
        row += [f"{_reduction(result, cell, h, runtime):+.1f}%" for h in others(result)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def speedup_table(result) -> str:
    """t_torch / t_runtime per head count for every runtime other than PyTorch ('' if none)."""
    compared = _compared(result)
    if not compared:
        return ""
    header = ["batch", "seq", "runtime"] + [f"{h}h" for h in result.heads]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    for cell in sorted(result.cells, key=lambda c: (c.batch, c.seq)):
        for runtime in compared:
            row = [str(cell.batch), str(cell.seq), runtime]
            row += [f"{speedup(cell, h, runtime):.2f}×" for h in result.heads]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def markdown_report(result) -> str:
    """The report: model, settings, machine facts, the ONNX check, then the table(s)."""
    s = result.settings
    count = next(iter(result.sanity.param_counts.values()))
    lines = [
        "# Student inference time vs attention-head count",
        "",
        f"- model: {result.source}; {count:,} parameters for every head count",
        (f"- runtimes: {', '.join(result.runtimes)}; device {s.device}, dtype {s.dtype}, attention {s.attn}, "
        "torch.inference_mode, eval()"),
        *[f"- {fact}" for fact in result.device_facts],
        (f"- timing: interleaved rounds (round-robin over runtimes and head counts), median per model; "
        f"at least {s.rounds} rounds per cell, budget {s.budget_s:.0f} s; total {result.seconds:.0f} s"),
        (f"- columns: ms per batch (median); reduction vs {result.baseline} heads = "
        f"(t{result.baseline} − th) / t{result.baseline} on the same runtime, positive = faster"),
    ]
    if result.onnx_check:
        shown = ", ".join(f"{h}h {d:.1e}" for h, d in result.onnx_check.items())
        lines.append(f"- ONNX graphs checked against PyTorch (max abs diff, padded inputs): {shown}")
    if result.dropped_heads:
        lines.append(f"- head counts skipped (do not divide the width): {result.dropped_heads}")
    text = "\n".join(lines) + "\n\n" + markdown_table(result) + "\n"
    if _compared(result):
        text += "\nSpeed-up over PyTorch (t_torch / t_runtime, same head count):\n\n" + speedup_table(result) + "\n"
    return text


def write_csv(result, path: Path) -> None:
    """One row per (batch, seq, runtime): medians, reductions, spreads and the speed-up over PyTorch."""
    header = ["batch", "seq", "runtime", "rounds", "calls_per_measure"]
    header += [f"ms_{h}h" for h in result.heads]
    header += [f"reduction_pct_{h}h_vs_{result.baseline}h" for h in others(result)]
    header += [f"iqr_pct_{h}h" for h in result.heads]
    with_speedup = bool(_compared(result))
    if with_speedup:
        header += [f"speedup_vs_torch_{h}h" for h in result.heads]
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for cell, runtime in _rows(result):
            row = [cell.batch, cell.seq, runtime, cell.rounds, cell.number]
            row += [f"{cell.ms(h, runtime):.4f}" for h in result.heads]
            row += [f"{_reduction(result, cell, h, runtime):.3f}" for h in others(result)]
            row += [f"{cell.spread_pct(h, runtime):.2f}" for h in result.heads]
            if with_speedup:
                row += [f"{speedup(cell, h, runtime):.4f}" for h in result.heads]
            writer.writerow(row)


def _panel(ax, result, seq: int, value, label: str, lines) -> None:
    cells = sorted((c for c in result.cells if c.seq == seq), key=lambda c: c.batch)
    batches = [c.batch for c in cells]
    for h, runtime in lines:
        ax.plot(
            batches, [value(c, h, runtime) for c in cells], marker="o", color=f"C{result.heads.index(h)}",
            linestyle="-" if runtime == "torch" else "--", label=f"{h} heads, {runtime}",
        )
    ax.axhline(0.0 if "reduction" in label else 1.0, color="grey", linewidth=0.8)
    if len(batches) > 1 and min(batches) > 0:
        ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_title(f"seq {seq}: {label}", fontsize="small")
    ax.set_xlabel("batch size")
    ax.grid(True, alpha=0.3)


def write_plot(result, path: Path) -> None:
    """Time reduction vs the baseline by batch size (one line per head count and runtime; one panel
    per sequence length) and, with several runtimes, onnxruntime's speed-up over PyTorch below it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seqs = sorted({c.seq for c in result.cells})
    compared = _compared(result)
    n_rows = 2 if compared else 1
    fig, axes = plt.subplots(
        n_rows, len(seqs), figsize=(5.6 * len(seqs) + 2.6, 3.8 * n_rows), squeeze=False, sharex="col"
    )
    reduction_lines = [(h, r) for r in result.runtimes for h in others(result)]
    for col, seq in enumerate(seqs):
        _panel(axes[0][col], result, seq, lambda c, h, r: _reduction(result, c, h, r),
               f"time reduction vs {result.baseline} heads (%)", reduction_lines)
        if compared:
            _panel(axes[1][col], result, seq, speedup, "speed-up over PyTorch (×)",
                   [(h, r) for r in compared for h in result.heads])
    for row in axes:
        row[-1].legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.02, 1.0))
    s = result.settings
    fig.suptitle(f"{result.source}: {s.device} {s.dtype} {s.attn}", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(result, out_dir: str | Path, log: Callable[[str], None] = print) -> dict[str, Path]:
    """Write ``inference_heads.md``, ``.csv`` and ``.png`` (without matplotlib: no plot, said so)."""
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
