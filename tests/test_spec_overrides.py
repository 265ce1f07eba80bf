"""``--set a.b.c=value`` on every launcher and ``mlkd-scale validate``; the shipped JSON Schema."""

import json
import sys
from pathlib import Path

import pytest
from test_cli import run_cli
from test_spec import minimal, workdir, write  # noqa: F401 (workdir is a fixture)

from mlkd_scale.spec import SpecError, load_spec
from mlkd_scale.spec.overrides import SCHEMA_FILE, apply_overrides, parse_override, schema_text

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("text", "steps", "value"),
    [
        ("train.lr=3e-4", ["train", "lr"], 3e-4),
        ("run.name=ablation", ["run", "name"], "ablation"),
        ('run.name="123"', ["run", "name"], "123"),
        ("train.max_steps=10", ["train", "max_steps"], 10),
        ("checkpoint.export_at_end=false", ["checkpoint", "export_at_end"], False),
        ("train.max_steps=null", ["train", "max_steps"], None),
        ('data.sources=[{"path": "x"}]', ["data", "sources"], [{"path": "x"}]),
        ("run.name=a=b", ["run", "name"], "a=b"),
    ],
)
def test_values_are_json_where_they_parse(text, steps, value):
    assert parse_override(text) == (steps, value)


@pytest.mark.parametrize("text", ["train.lr", "=3", "train..lr=1", ".lr=1"])
def test_a_malformed_override_is_one_error(text):
    with pytest.raises(SpecError, match="give FIELD=VALUE"):
        parse_override(text)


def test_overrides_equal_editing_the_file(workdir):  # noqa: F811
    edited = minimal(train={"max_steps": 7, "lr": 0.001}, run={"name": "b"})
    edited["data"]["sources"][0]["weight"] = 2.0
    by_file = load_spec(write(workdir, edited, "edited.json"))
    by_set = load_spec(
        write(workdir, minimal()),
        overrides=["train.max_steps=7", "train.lr=1e-3", "run.name=b", "data.sources.0.weight=2"],
    )
    assert by_set == by_file
    assert load_spec(write(workdir, minimal()), overrides=["train.max_steps=5", "train.max_steps=9"]).train.max_steps == 9


def test_a_bad_override_is_checked_like_the_file(workdir):  # noqa: F811
    path = write(workdir, minimal())
    with pytest.raises(SpecError) as info:
        load_spec(path, overrides=["train.lr=fast", "train.no_such_field=1"])
    text = str(info.value)
    assert "train.lr: Input should be a valid number" in text and "train.no_such_field" in text
    with pytest.raises(SpecError, match=r"run.name holds a str, not a section"):
        load_spec(path, overrides=["run.name=x", "run.name.first=1"])
    with pytest.raises(SpecError, match=r"data.sources is a list of 1; the next step must be an index 0..0"):
        load_spec(path, overrides=["data.sources.5.path=x"])
    with pytest.raises(SpecError, match=r"teacher.path: directory ./nowhere does not exist"):
        load_spec(path, overrides=["teacher.path=./nowhere"])


def test_overrides_to_a_list_and_a_new_section(workdir):  # noqa: F811
    spec = load_spec(write(workdir, minimal()), overrides=["data.sources.1={\"path\": \"corpus/a.txt\"}", "faults.max_nonfinite_steps=3"])
    assert [s.path for s in spec.data.sources] == ["corpus/*.txt", "corpus/a.txt"]
    assert spec.faults.max_nonfinite_steps == 3
    assert apply_overrides({"a": [1, 2]}, ["a.0=5"]) == {"a": [5, 2]}


def test_validate_takes_set_and_reports_bad_values(workdir):  # noqa: F811
    path = write(workdir, minimal())
    ok = run_cli("validate", str(path), "--set", "train.max_steps=12", "--set=run.name=viaset", cwd=workdir)
    assert ok.returncode == 0, ok.stderr
    assert "run 'viaset'" in ok.stdout and "12" in ok.stdout
    bad = run_cli("validate", str(path), "--set", "train.lr=fast", cwd=workdir)
    assert bad.returncode == 2 and "train.lr: Input should be a valid number" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_launchers_take_set(workdir, monkeypatch):  # noqa: F811
    from mlkd_scale.launch import launch

    seen = {}
    path = write(workdir, minimal())
    monkeypatch.setattr(sys, "argv", ["general_kd.py", "--spec", str(path), "--set", "train.lr=2e-3", "--set", "run.seed=7"])
    assert launch(lambda spec, stop_after_steps: seen.update(spec=spec), "doc", "help") == 0
    assert (seen["spec"].train.lr, seen["spec"].run.seed) == (2e-3, 7)
    monkeypatch.setattr(sys, "argv", ["general_kd.py", "--spec", str(path), "--set", "train.lr"])
    assert launch(lambda spec, stop_after_steps: None, "doc", "help") == 2


def test_schema_key_is_accepted_and_ignored(workdir):  # noqa: F811
    with_key = {"$schema": "../mlkd_scale/spec/run_spec.schema.json", **minimal()}
    assert load_spec(write(workdir, with_key, "a.json")) == load_spec(write(workdir, minimal(), "b.json"))
    with pytest.raises(SpecError, match=r"\$schema: must be the schema's path or URL"):
        load_spec(write(workdir, {"$schema": 3, **minimal()}, "c.json"))


def test_the_shipped_schema_is_current_and_the_examples_point_at_it():
    assert SCHEMA_FILE.read_text() == schema_text(), (
        "mlkd_scale/spec/run_spec.schema.json is stale: regenerate it with "
        "`mlkd-scale schema > mlkd_scale/spec/run_spec.schema.json`"
    )
    schema = json.loads(SCHEMA_FILE.read_text())
    assert "$schema" in schema["properties"] and "train" in schema["properties"]
    for example in sorted((REPO / "examples").glob("*.json")):
        pointer = json.loads(example.read_text())["$schema"]
        assert (example.parent / pointer).resolve() == SCHEMA_FILE, example
    for example in sorted((REPO / "examples").glob("*.yaml")):
        first = example.read_text().splitlines()[0]
        assert first.startswith("# yaml-language-server: $schema="), example
        assert (example.parent / first.split("=", 1)[1]).resolve() == SCHEMA_FILE, example
