"""teacher.placement 'zero3' on 2 CPU ranks through the real deepspeed launcher: each rank holds half
of the teacher, the features equal a replicated teacher's, and general / task distillation runs
with a partitioned teacher give the replicated teacher's losses and dev metrics."""

import json
from pathlib import Path

import pytest
import torch
from run_fixtures import REPO, check_ok, child_env, make_spec, run_launcher
from task_fixtures import make_task_teacher, run_task_launcher, task_spec

from mlkd_scale.engine.task.context import evaluate_model_dir
from mlkd_scale.engine.teacher_placement import place_teacher
from mlkd_scale.engine.trackers import read_scalars
from mlkd_scale.models import load_teacher
from mlkd_scale.spec import SpecError, load_spec
from mlkd_scale.spec.plan import resolve_plan

#: Every parameter partitioned (DeepSpeed keeps parameters under 1e5 elements whole by default).
PARTITION_ALL = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}


def _scalars(output_dir: Path) -> dict[str, list[float]]:
    return {tag: [v for _, v in values] for tag, values in read_scalars(output_dir / "tensorboard").items()}


@pytest.mark.launcher
def test_each_rank_holds_half_and_features_equal_the_replicas(tmp_path, assets):
    import subprocess
    import sys

    from run_fixtures import _free_port

    teacher, corpus = assets
    spec = make_spec(tmp_path, teacher, corpus, deepspeed__config=PARTITION_ALL)
    script = REPO / "tests" / "ds_scripts" / "teacher_zero3.py"
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(_free_port()),
           str(script), str(spec), str(tmp_path)]
    check_ok(subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=600, check=False))

    for rank in (0, 1):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for dtype, torch_dtype in (("fp32", "torch.float32"), ("bf16", "torch.bfloat16")):
            r = report[dtype]
            assert r["replica_bytes"] == r["full_bytes"]
            # half of every parameter, padded to a multiple of 2 elements: within 1% of one half
            assert r["held_bytes"] / r["full_bytes"] == pytest.approx(0.5, abs=0.01), r
            assert r["held_bytes"] >= r["full_bytes"] / 2
            assert r["held_bytes_after_forward"] == r["held_bytes"], "a layer stayed gathered after the forward"
            assert r["partition_dtypes"] == r["feature_dtypes"] == [torch_dtype], "the teacher's dtype changed"
            assert {"embeddings", "cls", "context1", "context4", "hidden1", "hidden4"} <= set(r["keys"])
            assert r["max_abs_diff"] <= 1e-6 and r["max_abs_diff_second_forward"] <= 1e-6, r
        assert report["copied_student_max_abs_diff"] == 0.0
        # DeepSpeed's default threshold keeps the small parameters whole: more than half is held
        assert report["default_threshold_held_after_forward"] > report["fp32"]["held_bytes"]


@pytest.mark.launcher
def test_general_distillation_with_a_zero3_teacher_matches_a_replicated_one(tmp_path, assets):
    teacher, corpus = assets
    runs = {}
    for placement in ("replicate", "zero3"):
        directory = tmp_path / placement
        directory.mkdir()
        # the student on ZeRO-3 with CPU offload: the zero3 teacher inherits offload_param
        spec = make_spec(directory, teacher, corpus, teacher__placement=placement, train__max_steps=3,
                         checkpoint__every_n_steps=3, train__zero_stage=3, deepspeed__config="zero3_offload.json")
        proc = check_ok(run_launcher(spec))
        assert f"teacher: {placement}" in proc.stdout
        assert (placement == "zero3") == ("(partitions on " in proc.stdout), "zero3 partitions the teacher, replicate does not"
        runs[placement] = _scalars(directory / "out")
    expected, got = runs["replicate"], runs["zero3"]
    for tag in ("loss/total", "loss/emb", "loss/mha", "loss/ffn"):
        assert len(got[tag]) == 3
        assert got[tag] == pytest.approx(expected[tag], rel=1e-6, abs=1e-9), tag


@pytest.mark.launcher
def test_task_distillation_with_a_zero3_teacher(tmp_path):
    """Teacher dev metrics through the partitioned teacher equal the teacher's own; the student is
    initialised from the partitioned teacher's layers and both stages run."""
    teacher = make_task_teacher(tmp_path / "teacher", "MRPC")
    budget = {"max_steps": 2, "lr": 1e-3}
    spec = task_spec(tmp_path, teacher, "MRPC", task__stage1=budget, task__stage2=budget,
                     teacher__placement="zero3",
                     student={"num_layers": 2, "hidden_size": 48, "num_heads": 3, "intermediate_size": 96,
                              "init": "teacher_layers"})
    proc = check_ok(run_task_launcher("task_kd.py", spec))
    assert "teacher: zero3" in proc.stdout and "run finished at step 4" in proc.stdout
    report = json.loads((tmp_path / "out" / "student" / "eval_results.json").read_text())
    alone = evaluate_model_dir(teacher, load_spec(spec).task)
    assert report["teacher_dev"]["validation"] == pytest.approx(alone["validation"], abs=1e-6)


def test_fp16_zero3_teacher_without_fp16_support_is_a_spec_error(tmp_path, assets):
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().is_fp16_supported():
        pytest.skip("this accelerator runs fp16; the refusal is for those that do not")
    teacher, corpus = assets
    spec = load_spec(make_spec(tmp_path, teacher, corpus, teacher__dtype="fp16", teacher__placement="zero3"))
    with pytest.raises(SpecError, match="teacher.dtype: fp16 with teacher.placement 'zero3'"):
        place_teacher(load_teacher(str(teacher), "fp16"), spec.teacher, resolve_plan(spec, 2), torch.device("cpu"))
