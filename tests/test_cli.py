"""The `mlkd-scale` command line, run as a user would: a subprocess, exit codes, no tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from mlkd_scale import cli

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "WORLD_SIZE"}
    environment.update({"PYTHONPATH": str(REPO), **(env or {})})
    return subprocess.run(
        [sys.executable, "-m", "mlkd_scale.cli", *args],
        check=False,
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (tmp_path / "a.txt").write_text("some text\n")
    return tmp_path


def write_spec(directory: Path, **train) -> Path:
    spec = {
        "teacher": {"path": "./teacher"},
        "data": {"sources": [{"path": "*.txt"}], "max_seq_length": 128},
        "train": {"max_steps": 1000, "micro_batch_size": 16, "gradient_accumulation_steps": 2, **train},
        "deepspeed": {"config": "zero2.json"},
    }
    path = directory / "f.json"
    path.write_text(json.dumps(spec))
    return path


def test_validate_prints_the_plan(workdir: Path) -> None:
    write_spec(workdir)
    result = run_cli("validate", "f.json", "--world_size", "4", cwd=workdir)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for line in (
        "world size     4",
        "micro batch    16",
        "accumulation   2",
        "global batch   128",
        "tokens/step    16,384",
        "total steps    1,000",
        "warm-up steps  10",
        "ZeRO stage     2",
    ):
        assert line in out, out
    ds = json.loads(out.split("DeepSpeed config:\n", 1)[1])
    assert ds["train_batch_size"] == 128 and ds["zero_optimization"]["overlap_comm"] is True


def test_validate_world_size_from_environment(workdir: Path) -> None:
    write_spec(workdir)
    result = run_cli("validate", "f.json", cwd=workdir, env={"WORLD_SIZE": "3"})
    assert result.returncode == 0, result.stderr
    assert "global batch   96 sequences per step" in result.stdout


def test_validate_bad_spec_exits_2_with_every_message(workdir: Path) -> None:
    path = write_spec(workdir, micro_batch_size=0, global_batch_size=100)
    spec = json.loads(path.read_text())
    spec["teacher"]["path"] = "./missing"
    spec["trainer"] = {}
    path.write_text(json.dumps(spec))
    result = run_cli("validate", "f.json", cwd=workdir)
    assert result.returncode == 2
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    err = result.stderr
    assert "f.json: invalid run spec (3 problems)" in err
    assert "train.micro_batch_size: Input should be greater than or equal to 1 (got 0)" in err
    assert "teacher.path: directory ./missing does not exist" in err
    assert "trainer: unknown key; did you mean 'train'?" in err
    assert "deepspeed.config" not in err  # zero2.json is found in the repo's ds_configs/


def test_validate_reports_batch_arithmetic_in_the_same_pass(workdir: Path) -> None:
    path = write_spec(workdir, global_batch_size=100)
    spec = json.loads(path.read_text())
    spec["teacher"]["path"] = "./missing"
    path.write_text(json.dumps(spec))
    result = run_cli("validate", "f.json", "--world_size", "2", cwd=workdir)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "teacher.path" in result.stderr
    assert "train.global_batch_size: is 100 but" in result.stderr and "world size 2 = 64" in result.stderr


@pytest.mark.parametrize(
    "content, message", [("{oops", "invalid JSON at line 1 column 2"), (None, "spec file not found")]
)
def test_validate_bad_file(workdir: Path, content: str | None, message: str) -> None:
    if content is not None:
        (workdir / "f.json").write_text(content)
    result = run_cli("validate", "f.json", cwd=workdir)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_validate_bad_world_size(workdir: Path) -> None:
    write_spec(workdir)
    result = run_cli("validate", "f.json", "--world_size", "0", cwd=workdir)
    assert result.returncode == 2 and "--world_size: must be a positive integer" in result.stderr
    result = run_cli("validate", "f.json", cwd=workdir, env={"WORLD_SIZE": "many"})
    assert result.returncode == 2 and "WORLD_SIZE: 'many' is not an integer" in result.stderr


def test_schema_prints_json_schema(tmp_path: Path) -> None:
    result = run_cli("schema", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    schema = json.loads(result.stdout)
    assert set(schema["required"]) == {"teacher", "train"}  # data or task: one of them, checked by RunSpec
    sections = {"run", "student", "losses", "data", "task", "deepspeed", "checkpoint", "logging"}
    assert sections <= set(schema["properties"])
    assert "micro_batch_size" in schema["$defs"]["TrainSpec"]["properties"]


def test_export_reports_a_missing_checkpoint(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    def missing(checkpoint: str, out: str) -> None:
        raise FileNotFoundError(f"{checkpoint}: no checkpoint here")

    fake = types.ModuleType("mlkd_scale.engine.export.hf_export")
    fake.export_checkpoint = missing
    monkeypatch.setitem(sys.modules, "mlkd_scale.engine.export.hf_export", fake)
    with pytest.raises(SystemExit) as info:
        cli.export("nowhere", "out")
    assert info.value.code == 2
    assert "export: nowhere: no checkpoint here" in capsys.readouterr().err


def test_export_of_a_missing_checkpoint_is_one_message(tmp_path: Path) -> None:
    result = run_cli("export", str(tmp_path / "no-checkpoint"), str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("export: ") and "Traceback" not in result.stderr
