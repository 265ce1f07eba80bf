"""Initialising the student from teacher layers: DistilBERT's every-other choice and the fit checks."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import tiny_teacher

from mlkd_scale.models import build_student, resolve_init_layers
from mlkd_scale.models.taps import encoder_modules
from mlkd_scale.spec import RunSpec, SpecError, StudentSpec, every_other_layers, load_spec

REPO = Path(__file__).resolve().parent.parent


def test_every_other_reproduces_distilbert_and_keeps_both_ends():
    # extract_distilbert.py: BERT-base layers [0, 2, 4, 7, 9, 11] (0-based) for DistilBERT's 6 layers.
    assert every_other_layers(6, 12) == [1, 3, 5, 8, 10, 12]
    assert every_other_layers(6, 11) == [1, 3, 5, 7, 9, 11]
    assert every_other_layers(3, 12) == [1, 10, 12]
    assert every_other_layers(1, 4) == [4]
    for n, m in [(2, 4), (4, 8), (5, 12), (6, 24)]:
        layers = every_other_layers(n, m)
        assert len(layers) == n and layers[-1] == m and all(b - a >= 2 for a, b in itertools.pairwise(layers))
    with pytest.raises(
        ValueError, match=r"student.init_layers: 'every_other' needs .* 4 for 3 student layers"
    ):
        every_other_layers(3, 4)


def test_init_layers_default_by_preset_and_explicit_choices():
    spec = StudentSpec(num_layers=2, hidden_size=48, num_heads=3, intermediate_size=64, init="teacher_layers")
    assert resolve_init_layers(spec, "distilbert", [2, 4], 4) == [1, 4]
    assert resolve_init_layers(spec, "mlkd", [2, 4], 4) == [2, 4]
    assert resolve_init_layers(
        spec.model_copy(update={"init_layers": "mapping"}), "distilbert", [2, 4], 4
    ) == [2, 4]
    assert resolve_init_layers(spec.model_copy(update={"init_layers": [3, 1]}), "mlkd", [2, 4], 4) == [3, 1]


def test_student_layers_are_copies_of_the_every_other_teacher_layers():
    teacher = tiny_teacher(layers=4)
    spec = StudentSpec(num_layers=2, hidden_size=48, num_heads=3, intermediate_size=64, init="teacher_layers")
    student = build_student(teacher, spec, resolve_init_layers(spec, "distilbert", [2, 4], 4))
    _, t_layers = encoder_modules(teacher)
    _, s_layers = encoder_modules(student)
    for s_layer, t_number in zip(s_layers, [1, 4]):
        t_state = t_layers[t_number - 1].state_dict()
        assert all((value == t_state[key]).all() for key, value in s_layer.state_dict().items())


@pytest.mark.parametrize(
    ("student", "message"),
    [
        ({"init_layers": "every_other"}, "init_layers: is set but init is 'random'"),
        (
            {"init": "teacher_layers", "num_layers": 2, "init_layers": [1]},
            "has 1 entries but num_layers is 2",
        ),
        ({"init": "teacher_layers", "num_layers": 2, "init_layers": [0, 2]}, "1-based"),
    ],
)
def test_init_layers_schema_errors(student, message):
    with pytest.raises(ValueError, match=message):
        StudentSpec(**student)


@pytest.fixture
def teacher_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A local teacher config (12 layers of width 384) and a corpus; the cwd."""
    (tmp_path / "teacher").mkdir()
    config = {"model_type": "bert", "num_hidden_layers": 12, "hidden_size": 384, "intermediate_size": 1536}
    (tmp_path / "teacher" / "config.json").write_text(json.dumps(config))
    (tmp_path / "a.txt").write_text("some text\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _spec(directory: Path, **student) -> Path:
    spec = {
        "teacher": {"path": "./teacher"},
        "student": {"num_heads": 12, "hidden_size": 384, "intermediate_size": 1536, **student},
        "losses": {"preset": "distilbert"},
        "data": {"sources": [{"path": "*.txt"}]},
        "train": {"max_steps": 10},
    }
    path = directory / "spec.json"
    path.write_text(json.dumps(spec))
    return path


def test_validate_time_checks_against_a_local_teacher_config(teacher_dir: Path):
    assert isinstance(load_spec(_spec(teacher_dir, init="teacher_layers", num_layers=6)), RunSpec)
    cases = [
        (
            {"init": "teacher_layers", "hidden_size": 312, "intermediate_size": 1200},
            (
                "student.init: 'teacher_layers' needs the teacher's width and FFN size (teacher.path ./teacher: "
                "hidden_size 384, intermediate_size 1536), the student has hidden_size 312, intermediate_size 1200"
            ),
        ),
        (
            {"init": "teacher_layers", "num_layers": 7},
            "student.init_layers: 'every_other' needs a teacher with",
        ),
        (
            {"init": "teacher_layers", "num_layers": 2, "init_layers": [1, 13]},
            "student.init_layers: entries [13] are outside the teacher's layers 1..12",
        ),
    ]
    for student, message in cases:
        with pytest.raises(SpecError) as info:
            load_spec(_spec(teacher_dir, **student))
        assert len(info.value.problems) == 1 and info.value.problems[0].startswith(message), (
            info.value.problems
        )
    assert isinstance(
        load_spec(_spec(teacher_dir, hidden_size=312, intermediate_size=1200)), RunSpec
    )  # random


def test_cli_validate_prints_one_sentence_for_a_width_mismatch(teacher_dir: Path):
    _spec(teacher_dir, init="teacher_layers", hidden_size=312, intermediate_size=1200)
    result = subprocess.run(
        [sys.executable, "-m", "mlkd_scale.cli", "validate", "spec.json"],
        cwd=teacher_dir,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(REPO)},
        check=False,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[0] == "spec.json: invalid run spec (1 problem)" and len(lines) == 2
    assert "student.init: 'teacher_layers' needs the teacher's width" in lines[1]
