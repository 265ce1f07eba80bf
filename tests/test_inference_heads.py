"""Smoke test of benchmarks/inference_heads.py on a tiny student, with injected (fake) timings."""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "inference_heads.py"


def _load():
    spec = importlib.util.spec_from_file_location("inference_heads", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


ih = _load()

# seconds per call, per head count, per round: medians are 10 ms (12 heads) and 6 ms (3 heads)
FAKE = {12: [0.010, 0.050, 0.009], 3: [0.006, 0.005, 0.100]}


class FakeTimer:
    """Returns the scripted time of each round and records the call order (no wall clock)."""

    def __init__(self):
        self.calls: list[tuple[int, int, int, int]] = []
        self.seen = {h: 0 for h in FAKE}

    def __call__(self, fn, *, heads, batch, seq, number):
        out = fn()  # the real (tiny) forward still runs: the seam only replaces the clock
        assert torch.isfinite(out).all()
        self.calls.append((heads, batch, seq, number))
        value = FAKE[heads][self.seen[heads]]
        self.seen[heads] += 1
        return value


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    config = ih.student_config(layers=1, hidden=24, ffn=48, heads=12, vocab=64, max_positions=32)
    config.initializer_range = 0.2  # peakier attention than the 0.02 default: a clear head-split signal
    student = ih.random_student(config, seed=0)
    settings = ih.StudySettings(
        heads=[3, 12, 5],  # 5 does not divide 24: dropped; the baseline 12 is moved to the front
        batches=[2],
        seqs=[8],
        rounds=3,
        max_rounds=3,
        budget_s=0.0,
        min_measure_ms=0.0,
    )
    timer = FakeTimer()
    logs: list[str] = []
    result = ih.run_study(student, settings, timer=timer, log=logs.append)
    out = tmp_path_factory.mktemp("inference_heads")
    paths = ih.write_outputs(result, out, log=logs.append)
    return result, paths, timer, logs, student


def test_heads_cells_and_interleaving(study):
    result, _, timer, logs, _ = study
    assert result.heads == [12, 3] and result.dropped_heads == [5] and result.baseline == 12
    assert len(result.cells) == 1
    cell = result.cells[0]
    assert (cell.batch, cell.seq, cell.rounds, cell.number) == (2, 8, 3, 1)
    # round-robin, the first model rotating each round
    assert [c[0] for c in timer.calls] == [12, 3, 3, 12, 12, 3]
    assert all(c[1:] == (2, 8, 1) for c in timer.calls)
    assert any("sanity" in line for line in logs)


def test_same_parameters_for_every_head_count(study):
    result, _, _, _, student = study
    counts = result.sanity.param_counts
    assert set(counts) == {12, 3}
    assert counts[12] == counts[3] == ih.param_count(ih.BertModel(student.config))
    # the head split matters: outputs differ well beyond the fp32 noise floor
    assert result.sanity.min_pair_diff > result.sanity.tolerance > 0


def test_reduction_is_relative_to_12_heads(study):
    result, paths, _, _, _ = study
    cell = result.cells[0]
    assert cell.ms(12) == pytest.approx(10.0) and cell.ms(3) == pytest.approx(6.0)  # medians
    assert result.reduction(cell, 3) == pytest.approx(100 * (10.0 - 6.0) / 10.0)
    assert ih.reduction_pct(0.010, 0.012) == pytest.approx(-20.0)  # slower: negative

    with paths["csv"].open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1
    row = rows[0]
    assert (row["batch"], row["seq"], row["rounds"]) == ("2", "8", "3")
    t12, t3 = float(row["ms_12h"]), float(row["ms_3h"])
    assert (t12, t3) == pytest.approx((10.0, 6.0))
    assert float(row["reduction_pct_3h_vs_12h"]) == pytest.approx(100 * (t12 - t3) / t12)

    table = paths["md"].read_text()
    assert "| batch | seq | 12h ms | 3h ms | 3h vs 12h |" in table
    assert "| 2 | 8 | 10.00 | 6.00 | +40.0% |" in table


def test_plot_written(study):
    pytest.importorskip("matplotlib")
    _, paths, _, _, _ = study
    png = paths["png"]
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_same_weights_loaded_into_each_head_count():
    config = ih.student_config(layers=1, hidden=24, ffn=48, heads=12, vocab=64, max_positions=32)
    student = ih.random_student(config, seed=1)
    a = ih.build_variant(student, 12, "sdpa", "cpu", torch.float32)
    b = ih.build_variant(student, 2, "eager", "cpu", torch.float32)
    assert a.config.num_attention_heads == 12 and b.config.num_attention_heads == 2
    assert b.config._attn_implementation == "eager"
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def test_quick_preset_and_explicit_flags():
    args = ih.parse_args(["--quick"])
    q = ih.QUICK
    assert (args.heads, args.batches, args.rounds) == (q["heads"], q["batches"], q["rounds"])
    args = ih.parse_args(["--quick", "--heads", "12", "1", "--seqs", "32"])
    assert args.heads == [12, 1] and args.seqs == [32] and args.batches == ih.QUICK["batches"]
    args = ih.parse_args([])
    assert args.heads == ih.DEFAULT_HEADS and args.batches == ih.DEFAULT_BATCHES
    assert args.seqs == ih.DEFAULT_SEQS


class RecordingTimer:
    """A fixed time per head count (no wall clock); keeps every output the real forwards gave."""

    def __init__(self):
        self.outputs: dict[int, list[torch.Tensor]] = {12: [], 3: []}

    def __call__(self, fn, *, heads, batch, seq, number):
        self.outputs[heads].append(fn())
        return {12: 0.010, 3: 0.006}[heads]


def test_onnxruntime_runtime_beside_pytorch(tmp_path):
    """Both runtimes timed in one study: each head count exported to ONNX, checked, run by
    onnxruntime on the same inputs as PyTorch (same outputs), and both shown in table and CSV."""
    config = ih.student_config(layers=1, hidden=24, ffn=48, heads=12, vocab=64, max_positions=32)
    config.initializer_range = 0.2
    settings = ih.StudySettings(
        heads=[12, 3], batches=[2], seqs=[8], runtimes=["torch", "onnxruntime"],
        rounds=2, max_rounds=2, budget_s=0.0, min_measure_ms=0.0,
    )
    timer, logs = RecordingTimer(), []
    result = ih.run_study(ih.random_student(config, seed=0), settings, timer=timer, log=logs.append)
    assert set(result.onnx_check) == {12, 3} and max(result.onnx_check.values()) <= 1e-4
    assert any(line.startswith("onnxruntime: exported 2 head counts") for line in logs)
    cell = result.cells[0]
    assert set(cell.times) == {("torch", 12), ("torch", 3), ("onnxruntime", 12), ("onnxruntime", 3)}
    for outs in timer.outputs.values():  # 2 rounds x 2 runtimes, all the same model's output
        assert len(outs) == 4 and all(torch.allclose(o, outs[0], atol=1e-4) for o in outs)
    assert not torch.allclose(timer.outputs[12][0], timer.outputs[3][0], atol=1e-3)

    paths = ih.write_outputs(result, tmp_path, log=logs.append)
    table = paths["md"].read_text()
    assert "| batch | seq | runtime | 12h ms | 3h ms | 3h vs 12h |" in table
    assert "| 2 | 8 | torch | 10.00 | 6.00 | +40.0% |" in table
    assert "| 2 | 8 | onnxruntime | 10.00 | 6.00 | +40.0% |" in table
    assert "| 2 | 8 | onnxruntime | 1.00× | 1.00× |" in table  # speed-up over PyTorch
    with paths["csv"].open() as f:
        rows = list(csv.DictReader(f))
    assert [r["runtime"] for r in rows] == ["torch", "onnxruntime"]
    assert float(rows[1]["speedup_vs_torch_3h"]) == pytest.approx(1.0)


def test_onnxruntime_needs_cpu_fp32():
    with pytest.raises(SystemExit):
        ih.parse_args(["--dtype", "bf16"])  # onnxruntime is a default runtime
    args = ih.parse_args(["--dtype", "bf16", "--runtimes", "torch"])
    assert args.runtimes == ["torch"]
    assert ih.parse_args([]).runtimes == ["torch", "onnxruntime"]
