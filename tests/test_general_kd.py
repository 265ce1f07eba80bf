"""General distillation end to end through the real deepspeed launcher on 2 CPU ranks."""

import math
import subprocess
import sys

import pytest
import torch
from run_fixtures import (
    REPO,
    check_ok,
    child_env,
    make_spec,
    run_launcher,
    run_torchrun,
    run_two_nodes,
    sample_ids,
)
from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer

from mlkd_scale.engine.checkpoints.manager import read_complete
from mlkd_scale.engine.trackers import read_scalars, read_texts
from mlkd_scale.spec import load_spec, spec_hash

pytestmark = pytest.mark.launcher


def _losses(output_dir):
    return [value for _, value in read_scalars(output_dir / "tensorboard")["loss/total"]]


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_stop_and_resume_matches_an_uninterrupted_run(tmp_path, assets, zero_stage):
    teacher, corpus = assets
    straight = tmp_path / "straight"
    straight.mkdir()
    spec = make_spec(straight, teacher, corpus, train__zero_stage=zero_stage)
    check_ok(run_launcher(spec))

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    spec = make_spec(resumed, teacher, corpus, train__zero_stage=zero_stage)
    first = check_ok(run_launcher(spec, "--stop_after_steps", "4"))
    assert "stopped (resumable) at step 4" in first.stdout
    assert not (resumed / "out" / "student").exists(), "a stopped run is not exported"
    second = check_ok(run_launcher(spec))
    assert "resumed from" in second.stdout and "step00000004" in second.stdout

    expected, got = _losses(straight / "out"), _losses(resumed / "out")
    assert len(expected) == len(got) == 6
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)

    ids_straight, ids_resumed = sample_ids(straight / "out"), sample_ids(resumed / "out")
    assert len(ids_resumed) == len(set(ids_resumed)), "a document was trained on twice"
    assert sorted(ids_resumed) == sorted(ids_straight), "documents were lost or added by the restart"
    assert len(ids_straight) > 20


def test_tensorboard_export_and_spec_text(tmp_path, assets):
    teacher, corpus = assets
    spec = make_spec(tmp_path, teacher, corpus, train__max_steps=4, checkpoint__every_n_steps=2)
    proc = check_ok(run_launcher(spec))
    out = tmp_path / "out"
    scalars = read_scalars(out / "tensorboard")
    for tag in ("loss/total", "loss/emb", "loss/mha", "loss/ffn", "train/lr", "train/grad_norm",
                "train/loss_scale", "throughput/tokens_per_s", "throughput/samples_per_s", "memory/peak_gib",
                "data/documents_read", "data/documents_skipped", "data/epoch_mean"):
        assert tag in scalars, f"{tag} missing from TensorBoard"
        assert [s for s, _ in scalars[tag]] == [1, 2, 3, 4]
        assert all(math.isfinite(v) for _, v in scalars[tag])
    assert '"max_steps": 4' in read_texts(out / "tensorboard")["spec/text_summary"][0]
    assert "Stage-1 loss:" in proc.stdout

    student = AutoModel.from_pretrained(out / "student")
    tokenizer = AutoTokenizer.from_pretrained(out / "student")
    assert (student.config.num_hidden_layers, student.config.hidden_size, student.config.num_attention_heads) == (2, 24, 3)
    ids = tokenizer(["a relation of tokens"], return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(student(**ids).last_hidden_state).all()
    kept = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step"))
    assert kept == ["step00000002", "step00000004"]

    card = (out / "student" / "README.md").read_text()  # the model card
    assert card.startswith("---\nlibrary_name: transformers\n") and f"`{teacher}`" in card
    assert "2 layers, hidden 24, **3 attention heads**, FFN 48" in card and "optimizer step 4" in card
    assert f"| spec hash | `{spec_hash(load_spec(spec))}` |" in card
    assert "preset `mlkd`, stage 1: `emb` × 1, `mha` × 1, `ffn` × 1" in card
    tokens = read_scalars(out / "tensorboard")["train/tokens_seen"][-1][1]
    assert f"| tokens seen | {int(tokens)} |" in card


def test_plain_python_single_process_bf16(tmp_path, assets):
    teacher, corpus = assets
    spec = make_spec(tmp_path, teacher, corpus, train__max_steps=2, train__precision="bf16",
                     teacher__dtype="bf16", train__zero_stage=1)
    proc = subprocess.run([sys.executable, str(REPO / "launchers" / "general_kd.py"), "--spec", str(spec)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env=child_env())
    check_ok(proc)
    assert "run finished at step 2" in proc.stdout
    assert read_complete(tmp_path / "out" / "checkpoints" / "step00000002")["world_size"] == 1


def test_tinybert_preset_runs_on_sdpa_models(tmp_path, assets):
    """The attention loss gets its maps from the mapped layers; nothing switches the models to eager."""
    teacher, corpus = assets
    spec = make_spec(tmp_path, teacher, corpus, train__max_steps=2, train__zero_stage=0,
                     student__num_heads=12, losses__preset="tinybert")
    proc = subprocess.run([sys.executable, str(REPO / "launchers" / "general_kd.py"), "--spec", str(spec)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600, env=child_env())
    check_ok(proc)
    scalars = read_scalars(tmp_path / "out" / "tensorboard")
    for tag in ("loss/emb", "loss/attn", "loss/hidden"):
        assert [s for s, _ in scalars[tag]] == [1, 2] and all(v > 0 and math.isfinite(v) for _, v in scalars[tag])
    assert AutoModel.from_pretrained(tmp_path / "out" / "student").config.num_attention_heads == 12


def test_distilbert_preset_runs_with_mlm_models_and_exports_a_loadable_student(tmp_path, assets):
    """The distilbert preset trains a BertForMaskedLM student initialised from every other teacher
    layer; the quick-start-like teacher (a bare encoder) is named in a warning for its missing MLM head."""
    teacher, corpus = assets
    spec = make_spec(tmp_path, teacher, corpus, train__max_steps=2, train__zero_stage=2, losses__preset="distilbert",
                     student__num_heads=12, student__hidden_size=48, student__intermediate_size=96,
                     student__init="teacher_layers")
    proc = subprocess.run([sys.executable, str(REPO / "launchers" / "general_kd.py"), "--spec", str(spec)],
                          check=False, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=child_env())
    check_ok(proc)
    assert f"teacher {teacher} has no trained weights for cls.predictions" in proc.stderr
    export = tmp_path / "out" / "student"
    assert AutoModelForMaskedLM.from_pretrained(export).config.architectures == ["BertForMaskedLM"]
    student = AutoModel.from_pretrained(export)
    ids = AutoTokenizer.from_pretrained(export)(["a relation of tokens"], return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(student(**ids).last_hidden_state).all()


def test_torchrun(tmp_path, assets):
    teacher, corpus = assets
    check_ok(run_torchrun(make_spec(tmp_path, teacher, corpus, train__max_steps=2)))
    assert read_complete(tmp_path / "out" / "checkpoints" / "step00000002")["world_size"] == 2
    assert AutoModel.from_pretrained(tmp_path / "out" / "student").config.num_hidden_layers == 2


def test_two_nodes_with_a_hostfile_and_no_ssh(tmp_path, assets):
    teacher, corpus = assets
    spec = make_spec(tmp_path, teacher, corpus, train__max_steps=2)
    (out0, rc0), (out1, rc1) = run_two_nodes(spec)
    assert rc0 == 0 and rc1 == 0, out0[-3000:] + out1[-3000:]
    assert "dist_world_size=2" in out0
    assert read_complete(tmp_path / "out" / "checkpoints" / "step00000002")["world_size"] == 2
    ids = sample_ids(tmp_path / "out")
    assert len(ids) == len(set(ids)) > 0
