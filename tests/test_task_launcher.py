"""Task distillation through the real deepspeed launcher on 2 CPU ranks: stop mid-stage, resume, export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from run_fixtures import check_ok
from task_fixtures import make_task_teacher, run_task_launcher, task_spec

from mlkd_scale.engine.checkpoints.manager import read_complete
from mlkd_scale.engine.task.context import evaluate_model_dir
from mlkd_scale.engine.trackers import read_scalars
from mlkd_scale.spec import load_spec

pytestmark = pytest.mark.launcher


def test_two_ranks_stop_in_stage2_resume_and_export(tmp_path: Path) -> None:
    teacher = make_task_teacher(tmp_path / "teacher", "MRPC")
    budget = {"max_steps": 4, "lr": 1e-3}
    spec = task_spec(tmp_path, teacher, "MRPC", task__stage1=budget, task__stage2=budget,
                     task__eval_every_n_steps=2, checkpoint={"every_n_steps": 1, "keep_last": 1})
    first = check_ok(run_task_launcher("task_kd.py", spec, "--stop_after_steps", "6"))
    assert "stage1 finished at step 4" in first.stdout
    assert "run stopped (resumable) at step 6" in first.stdout
    out = tmp_path / "out"
    assert not (out / "student").exists(), "a stopped run is not exported"

    second = check_ok(run_task_launcher("task_kd.py", spec))
    assert "stage1 already finished" in second.stdout
    assert "stage2/checkpoints/step00000002 at stage2 step 2" in second.stdout
    assert "run finished at step 8" in second.stdout

    # one curve over both launches: every run step logged once, Stage 2 continuing Stage 1
    scalars = read_scalars(out / "tensorboard")
    assert [s for s, _ in scalars["stage1/loss/total"]] == [1, 2, 3, 4]
    assert [s for s, _ in scalars["stage2/loss/total"]] == [5, 6, 7, 8]
    assert [s for s, _ in scalars["eval/acc_and_f1"]] == [2, 4, 6, 8]

    for stage in ("stage1", "stage2"):
        ckpt = out / stage / "checkpoints"
        best = json.loads((ckpt / "best.json").read_text())
        assert read_complete(ckpt / best["tag"])["world_size"] == 2, "the pinned best was pruned"
        assert sorted(p.name for p in ckpt.glob("step*")) == sorted({best["tag"], "step00000004"})

    # the exported best student scores on dev what the run recorded
    report = json.loads((out / "student" / "eval_results.json").read_text())
    stage2 = json.loads((out / "stage2" / "result.json").read_text())
    assert report["step"] == stage2["best"]["step"] and report["dev"] == stage2["best"]["metrics"]
    card = (out / "student" / "README.md").read_text()
    assert f"task distillation on {load_spec(spec).task.name}, stage2" in card and "model-index:" in card
    for name, value in report["dev"]["validation"].items():
        if isinstance(value, float):
            assert f"- name: validation/{name}\n      type: validation/{name}\n      value: {value}" in card
    reloaded = evaluate_model_dir(out / "student", load_spec(spec).task)
    assert reloaded["validation"] == pytest.approx(report["dev"]["validation"], abs=1e-6)
