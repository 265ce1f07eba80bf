"""Smoke and correctness tests of the benchmark scripts (benchmarks/); never about wall-clock time.

* the FLOP formula behind MFU, against PyTorch's own FLOP counter and against hand arithmetic;
* the peers' TinyBERT losses (the hand-written Hugging Face loop and TextBrewer's) against our
  objective's tinybert terms on the same forward: the comparison is only fair if they agree
  (TextBrewer's attention term differs by its zeroing threshold only, checked as such);
* each script end to end on tiny models (in a subprocess: DeepSpeed sets up a process group).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import BertConfig, BertModel

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import common
import peer_steps
import peers

from mlkd_scale.models import FeatureTap, TapRequest
from mlkd_scale.spec import LossesSpec

ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


# ---- FLOPs ---------------------------------------------------------------------------------------


def test_flops_by_hand_for_a_tiny_config():
    config = BertConfig(hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16)
    # per token and layer: QKVO 4·8·8 MACs, FFN 2·8·16 MACs, scores + context 2·4·8 MACs; ×2 FLOPs/MAC
    per_token_layer = 2 * (4 * 8 * 8 + 2 * 8 * 16 + 2 * 4 * 8)
    assert per_token_layer == 1152
    assert common.encoder_forward_flops(config, 4) == 4 * 2 * 1152 + 2 * 8 * 8  # + pooler on [CLS]
    assert common.encoder_forward_flops(config, 4, pooler=False) == 4 * 2 * 1152


def test_flops_match_pytorch_flop_counter():
    config = BertConfig(
        vocab_size=100,
        hidden_size=24,
        num_hidden_layers=2,
        num_attention_heads=3,
        intermediate_size=40,
        max_position_embeddings=32,
    )
    model = BertModel(config).eval()
    model.set_attn_implementation("eager")  # SDPA's attention matmuls are invisible to the counter
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(input_ids=torch.randint(0, 100, (3, 16)))
    assert counter.get_total_flops() == 3 * common.encoder_forward_flops(config, 16)


def test_bert_base_step_flops():
    teacher = common.teacher_config("bert-base")
    student = BertConfig(
        **{**teacher.to_dict(), "num_hidden_layers": 4, "hidden_size": 312, "intermediate_size": 1200}
    )
    t, s = common.encoder_forward_flops(teacher, 128), common.encoder_forward_flops(student, 128)
    assert t == 128 * 12 * (8 * 768**2 + 4 * 768 * 3072 + 4 * 128 * 768) + 2 * 768**2
    assert round(t / 1e9, 2) == 22.35 and round(s / 1e9, 2) == 1.25  # the figures in throughput.py
    assert common.distillation_step_flops(teacher, student, 8, 128) == 8 * (t + 3 * s)


# ---- the peers' losses agree with ours -----------------------------------------------------------


def _tiny_pair(teacher_dtype: torch.dtype):
    torch.manual_seed(0)
    teacher, student, objective = common.build_models(
        "tiny", "cpu", "fp32", 12, LossesSpec(preset="tinybert")
    )
    teacher.to(teacher_dtype)
    student.eval()  # no dropout: the separate forwards below must see the same attention maps
    batch = common.make_batch(3, 20, "cpu", teacher.config.vocab_size, pad=True)
    batch["attention_mask"][1, 13:] = 0
    return teacher, student, objective, batch


def _ours(teacher, student, objective, batch) -> tuple[dict[str, torch.Tensor], object, object]:
    # Every teacher layer computes its scores explicitly, as eager attention does, so that a bf16 teacher
    # gives both sides the same forward; that the selective path equals eager is test_taps' job.
    every_layer = TapRequest(attention_scores_layers=frozenset(range(1, teacher.config.num_hidden_layers + 1)))
    with FeatureTap(teacher, objective.teacher_request().merged(every_layer)) as t_tap, torch.no_grad():
        t_feats = t_tap(**batch)
    with FeatureTap(student, objective.student_request()) as s_tap:
        s_feats = s_tap(**batch)
    total, terms = objective(t_feats, s_feats, batch["attention_mask"])
    return {**terms, "total": total}, t_feats, s_feats


def _as_peers_run(*models):
    """The peers read every layer's scores from eager attention (ours computes them selectively)."""
    for model in models:
        model.set_attn_implementation(peer_steps.EAGER_SCORES)


def _hf_outputs(teacher, student, batch):
    _as_peers_run(teacher, student)
    with torch.no_grad():
        t = teacher(**batch, output_hidden_states=True, output_attentions=True)
    s = student(**batch, output_hidden_states=True, output_attentions=True)
    return t, s


@pytest.mark.parametrize("teacher_dtype", [torch.float32, torch.bfloat16])
def test_hf_loop_losses_equal_our_tinybert_terms(teacher_dtype):
    teacher, student, objective, batch = _tiny_pair(teacher_dtype)
    ours, _, _ = _ours(teacher, student, objective, batch)
    t, s = _hf_outputs(teacher, student, batch)
    assert len(objective.projections) == 1, "TinyBERT's one shared fit_dense"
    ref = peer_steps.tinybert_reference_losses(
        t.hidden_states, t.attentions, s.hidden_states, s.attentions, objective.projections[0], objective.layer_map
    )
    assert set(ref) == set(ours) - {"total"} == {"emb", "hidden", "attn"}
    for name, value in ref.items():
        torch.testing.assert_close(value, ours[name], rtol=1e-5, atol=1e-7, msg=name)
    assert all(v > 0 for v in ref.values())


def test_the_peers_attention_maps_are_scores_with_masked_keys_zeroed():
    """Scores, not probabilities: negative entries, and padded keys at ≤ −100 (zeroed by the loss)."""
    teacher, student, _, batch = _tiny_pair(torch.float32)
    t, _ = _hf_outputs(teacher, student, batch)
    scores = t.attentions[0]
    padded_keys = batch["attention_mask"][:, None, None, :] == 0
    assert (scores[~padded_keys.expand_as(scores)] < 0).any()
    assert (scores.masked_select(padded_keys) <= -100).all() and padded_keys.any()
    zeroed = peer_steps.zeroed_mse(scores, torch.zeros_like(scores))
    real_only = scores.masked_fill(padded_keys, 0).square().mean()
    torch.testing.assert_close(zeroed, real_only)


def test_textbrewer_losses_equal_our_tinybert_terms(tmp_path):
    """TextBrewer's hidden_mse terms equal ours; its attention_mse is TinyBERT's formula with its own
    zeroing threshold (−1e-3) on the same scores our taps record."""
    pytest.importorskip("textbrewer")
    from mlkd_scale.losses import attention_score_mse_loss

    teacher, student, objective, batch = _tiny_pair(torch.float32)
    ours, t_feats, s_feats = _ours(teacher, student, objective, batch)
    _as_peers_run(teacher, student)
    distiller = peer_steps.build_textbrewer(
        teacher, student, objective.layer_map, "cpu", str(tmp_path), upcast=False
    )
    assert len(distiller.projs) == 2 * len(objective.layer_map) + 1
    with torch.no_grad():  # every hidden match gets our one shared projection
        for proj in distiller.projs:
            if proj is not None:
                proj.load_state_dict(objective.projections[0].state_dict())
    total, losses = distiller.train_on_batch(batch, {"output_hidden_states": True, "output_attentions": True})
    grouped = {"emb": 0.0, "hidden": 0.0, "attn": 0.0}
    for name, value in losses.items():  # e.g. unweighted_hidden_hidden_mse_0_0, ..._attention_attention_mse_1_5
        key = "attn" if name.startswith("unweighted_attention") else "emb" if name.endswith("_0_0") else "hidden"
        grouped[key] = grouped[key] + value
    for name in ("emb", "hidden"):
        torch.testing.assert_close(grouped[name], ours[name], rtol=1e-5, atol=1e-7, msg=name)
    at_textbrewer_threshold = sum(
        attention_score_mse_loss(t_feats.attention_scores[m], s_feats.attention_scores[n], -1e-3)
        for n, m in enumerate(objective.layer_map, start=1)
    )
    torch.testing.assert_close(grouped["attn"], at_textbrewer_threshold, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(total, grouped["emb"] + grouped["hidden"] + grouped["attn"], rtol=1e-5, atol=1e-6)


def test_textbrewer_matches_follow_the_uniform_mapping():
    matches = peer_steps.textbrewer_matches([2, 4], 24, 48)
    hidden = [(m["layer_S"], m["layer_T"]) for m in matches if m["feature"] == "hidden"]
    attention = [(m["layer_S"], m["layer_T"]) for m in matches if m["feature"] == "attention"]
    assert hidden == [(0, 0), (1, 2), (2, 4)]  # hidden_states[0] is the embedding output
    assert attention == [(0, 1), (1, 3)]  # attentions[n-1] is layer n
    assert all(m["proj"] == ["linear", 24, 48] for m in matches if m["feature"] == "hidden")


# ---- the scripts end to end, tiny ----------------------------------------------------------------


def _run(cmd: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_throughput_script_on_tiny_models(tmp_path):
    out = tmp_path / "throughput.json"
    proc = _run(
        [
            sys.executable,
            str(BENCHMARKS / "throughput.py"),
            "--shapes",
            "tiny",
            "--seq",
            "16",
            "--batch",
            "4",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--threads",
            "1",
            "--json",
            str(out),
        ],
        tmp_path,
    )
    result = json.loads(out.read_text())
    assert result["world_size"] == 1 and len(result["ranks"]) == 1
    rank = result["ranks"][0]
    assert len(rank["step_times"]) == 2 and rank["tokens_per_s"] > 0 and rank["peak_mem_gib"] > 0
    assert rank["tokens_per_s"] == pytest.approx(4 * 16 / rank["step_s"])
    assert rank["measured_peak_tflops"] > 0
    config = common.teacher_config("tiny")
    student = BertConfig(
        **{**config.to_dict(), "num_hidden_layers": 2, "hidden_size": 24, "intermediate_size": 48}
    )
    assert result["step_flops"] == common.distillation_step_flops(config, student, 4, 16)
    assert "tokens/s" in proc.stdout and "MFU" in proc.stdout


def test_peers_script_on_tiny_models(tmp_path):
    out = tmp_path / "peers.json"
    proc = _run(
        [
            sys.executable,
            str(BENCHMARKS / "peers.py"),
            "--shapes",
            "tiny",
            "--seq",
            "16",
            "--batch",
            "4",
            "--rounds",
            "2",
            "--warmup",
            "1",
            "--threads",
            "1",
            "--json",
            str(out),
        ],
        tmp_path,
    )
    result = json.loads(out.read_text())
    expected = set(peers.CANDIDATES)
    try:
        import textbrewer  # noqa: F401
    except ImportError:
        expected.discard("textbrewer")
        assert any("textbrewer" in note for note in result["notes"])
    assert set(result["candidates"]) == expected
    for name, c in result["candidates"].items():
        assert len(c["step_times"]) == 2 and c["tokens_per_s"] > 0, name
    assert result["candidates"]["bare"]["vs_bare"] == 1.0
    assert result["candidates"]["ours-tinybert"]["ours_tinybert_speedup"] == 1.0
    assert "time / bare" in proc.stdout


def test_peers_rejects_unknown_candidates():
    with pytest.raises(SystemExit):
        peers.parse_args(["--candidates", "bare,nonesuch"])


def test_objective_overhead_uses_the_shared_pieces():
    import objective_overhead

    assert objective_overhead.bare_step is common.bare_step
    assert objective_overhead.timed_with_cpu is common.timed_with_cpu


def test_objective_overhead_baseline_swaps_the_loss_functions_and_puts_them_back(tmp_path):
    """--baseline runs the mlkd preset with another checkout's loss functions, then restores its own."""
    import objective_overhead as oo

    from mlkd_scale.losses.presets import mlkd

    functions = oo.load_baseline(REPO)
    assert set(functions) == {n for names in oo.BASELINE_FUNCTIONS.values() for n in names}
    assert functions["mha_relation_loss"] is not mlkd.mha_relation_loss  # a separate import
    own = mlkd.mha_relation_loss
    g = torch.Generator().manual_seed(0)
    t, s = torch.randn(2, 5, 12, generator=g), torch.randn(2, 5, 6, generator=g)
    with oo.preset_functions(functions):
        assert mlkd.mha_relation_loss is functions["mha_relation_loss"]
        assert mlkd.mha_relation_loss(t, s, None, 3).item() == pytest.approx(own(t, s, None, 3).item())
    assert mlkd.mha_relation_loss is own
    with pytest.raises(SystemExit, match="mlkd_scale checkout"):
        oo.load_baseline(tmp_path)


def test_objective_overhead_script_with_the_compiled_objective(tmp_path):
    cmd = [sys.executable, str(BENCHMARKS / "objective_overhead.py"), "--batch", "1", "--seq", "16",
           "--pairs", "3", "--warmup", "1", "--padding", "--compile", "--threads", "1"]
    out = _run(cmd, tmp_path).stdout
    for name in ("objective", "compiled"):
        assert f"overhead ratio {name}/bare" in out


@pytest.mark.launcher
def test_throughput_under_the_deepspeed_launcher(tmp_path):
    out = tmp_path / "throughput.json"
    deepspeed = Path(sys.executable).parent / "deepspeed"
    proc = _run(
        [
            str(deepspeed),
            "--num_gpus",
            "2",
            "--master_port",
            str(_free_port()),
            str(BENCHMARKS / "throughput.py"),
            "--shapes",
            "tiny",
            "--seq",
            "16",
            "--batch",
            "4",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--threads",
            "1",
            "--no-measure-peak",
            "--json",
            str(out),
        ],
        tmp_path,
    )
    result = json.loads(out.read_text())
    assert result["world_size"] == 2 and [r["rank"] for r in result["ranks"]] == [0, 1]
    assert result["tokens_per_s"] == pytest.approx(sum(r["tokens_per_s"] for r in result["ranks"]))
    assert "\nall " in proc.stdout


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_data_loading_compares_both_paths(tmp_path, capsys):
    import data_loading
    from run_fixtures import make_corpus, make_spec, make_teacher

    spec = make_spec(tmp_path, make_teacher(tmp_path / "teacher"), make_corpus(tmp_path / "c.jsonl", docs=200))
    data_loading.main(["--spec", str(spec), "--batch", "4", "--seconds", "0.2", "--rounds", "1", "--workers", "0"])
    out = capsys.readouterr().out
    assert "sequences of 32 tokens" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("streamed", "pretok"))}
    assert set(rows) == {"streamed", "pretokenized"}
    assert float(rows["streamed"][-1]) == 1.0 and float(rows["pretokenized"][1].replace(",", "")) > 0


def test_compare_presets_smoke(tmp_path):
    """The preset comparison end to end on tiny models: general KD, agreement, task KD, latency, table, plot."""
    from run_fixtures import make_corpus, make_teacher

    teacher = make_teacher(tmp_path / "teacher")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    make_corpus(corpus / "train.jsonl", docs=80)
    sentences = [
        "The parser reads every line of the file and returns a list of words.",
        "A socket connects two programs that exchange bytes over the network.",
        "This function returns the absolute value of the number given to it.",
        "The queue holds items until a worker thread takes them for processing.",
    ]
    (corpus / "heldout.jsonl").write_text(json.dumps({"id": "h", "text": " ".join(sentences)}) + "\n")
    out = tmp_path / "compare"
    student = {"num_layers": 2, "hidden_size": 48, "num_heads": 12, "intermediate_size": 96, "init": "teacher_layers"}
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "compare_presets.py"), "--variants", "mlkd", "mlkd-4h",
         "--seeds", "0", "--steps", "2", "--batch", "4", "--seq", "32", "--task-epochs", "1",
         "--latency-rounds", "2", "--threads", "1", "--out", str(out), "--teacher", str(teacher),
         "--corpus", str(corpus), "--task-data", str(REPO / "tests/assets/glue/SST-2"),
         "--student", json.dumps(student), "--finetune", json.dumps({"epochs": 1})],
        check=False, capture_output=True, text=True, cwd=REPO, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [(r["variant"], r["seed"]) for r in rows] == [("mlkd", "0"), ("mlkd-4h", "0")]
    for row in rows:
        assert -1 <= float(row["agreement"]) <= 1 and 0 <= float(row["dev_accuracy"]) <= 1
        assert float(row["inference_ms"]) > 0
    report = (out / "results.md").read_text()
    assert "mlkd-4h" in report and "tfidf" in report and (out / "results.png").stat().st_size > 0
    # the 4-head student really has 4 heads; the comparison reuses finished runs when run again
    config = json.loads((out / "mlkd-4h-seed0" / "general" / "student" / "config.json").read_text())
    assert config["num_attention_heads"] == 4
    assert json.loads((out / "mlkd-seed0" / "run.json").read_text())["variant"] == "mlkd"


def test_teacher_cache_benchmark_runs_both_variants_side_by_side(tmp_path):
    """The task stages with the live and the cached teacher, one run each, epoch times and speed-ups."""
    from task_fixtures import make_task_teacher, task_spec

    teacher = make_task_teacher(tmp_path / "teacher", "SST-2")
    budget = {"epochs": 2, "lr": 1e-3}
    spec = task_spec(tmp_path, teacher, "SST-2", task__stage1=budget, task__stage2=budget)
    out, report = tmp_path / "bench", tmp_path / "tc.json"
    proc = _run([sys.executable, str(BENCHMARKS / "teacher_cache.py"), "--spec", str(spec), "--ranks", "1",
                 "--epochs", json.dumps({"stage2": 3}), "--out", str(out), "--json", str(report)], tmp_path)
    result = json.loads(report.read_text())
    assert result["order"] == ["live", "cached"] and "cpu" in result["machine"]
    epochs = {name: {stage: len(s["epochs"]) for stage, s in runs[0]["stages"].items()}
              for name, runs in result["runs"].items()}
    assert epochs == {"live": {"stage1": 2, "stage2": 3}, "cached": {"stage1": 2, "stage2": 3}}
    for stage, row in result["summary"].items():
        assert row["live"]["build_s"] == 0 and row["cached"]["build_s"] > 0, stage
        assert row["cached"]["later_epoch_s"] > 0 and all(v > 0 for v in row["speedup"].values())
    assert list((out / "cached0" / "teacher_cache").glob("stage*-*/build.json"))
    assert not (out / "live0" / "teacher_cache").exists()
    assert "later epochs speed-up" in proc.stdout and "whole launch" in proc.stdout
