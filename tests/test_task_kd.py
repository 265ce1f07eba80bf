"""Task distillation and teacher fine-tuning end to end in this process (world size 1, tiny models).

Every GLUE task runs Stage 1 and Stage 2 on the tiny files of ``tests/assets/glue`` with a random
tiny task teacher; the multi-rank launcher path is in ``test_task_launcher.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from run_fixtures import make_teacher
from task_fixtures import make_task_teacher, task_spec
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertModel,
)

from mlkd_scale.engine.checkpoints.manager import read_complete
from mlkd_scale.engine.task.distill import (
    run_task_kd,
    stage2_module_from_stage1,
)
from mlkd_scale.engine.task.finetune import run_finetune
from mlkd_scale.engine.task.stage import full_state_dict
from mlkd_scale.engine.trackers import read_scalars
from mlkd_scale.spec import load_spec
from mlkd_scale.tasks.glue.table import TASKS, get_task
from mlkd_scale.tasks.registry import open_task

ALL_TASKS = [task.name for task in TASKS.values()]


def _run(spec_path: Path, world, capsys, stop: int | None = None) -> tuple[dict, str]:
    result = run_task_kd(load_spec(spec_path), stop_after_steps=stop, dist=world)
    return result, capsys.readouterr().out


def _scalars(out: Path, prefixes=("stage1/loss/", "stage2/loss/", "eval/")) -> dict:
    return {k: v for k, v in read_scalars(out / "tensorboard").items() if k.startswith(prefixes)}


@pytest.mark.parametrize("name", ALL_TASKS)
def test_every_glue_task_end_to_end(tmp_path: Path, world, capsys, name: str) -> None:
    task = get_task(name)
    teacher = make_task_teacher(tmp_path / "teacher", name)
    budget = {"max_steps": 2, "lr": 1e-3}
    spec = task_spec(tmp_path, teacher, name, task__stage1=budget, task__stage2=budget)
    result, stdout = _run(spec, world, capsys)
    assert result["finished"] and "run finished at step 4" in stdout
    assert "teacher dev:" in stdout and "student (stage2 step 2) dev:" in stdout

    out = tmp_path / "out"
    report = json.loads((out / "student" / "eval_results.json").read_text())
    assert report["task"] == task.name and report["stage"] == "stage2" and report["main_metric"] == task.main_metric
    assert list(report["dev"]) == list(task.dev_splits)  # MNLI: matched and mismatched
    assert all(set(m) == set(task.metrics) for m in report["dev"].values())
    assert set(report["teacher_dev"]) == set(task.dev_splits)

    student = AutoModelForSequenceClassification.from_pretrained(out / "student")
    assert student.config.num_labels == task.num_labels and student.config.num_hidden_layers == 2
    if not task.is_regression:
        assert [student.config.id2label[i] for i in range(task.num_labels)] == list(task.label_names)

    scalars = _scalars(out)
    assert {"stage1/loss/emb", "stage1/loss/mha", "stage1/loss/ffn", "stage2/loss/ss", "stage2/loss/kd"} <= set(scalars)
    # STS-B is regression: KD is an MSE and L_SC is off by default (no labels to contrast)
    assert ("stage2/loss/sc" in scalars) != task.is_regression
    assert [s for s, _ in scalars["stage1/loss/total"]] == [1, 2]
    assert [s for s, _ in scalars["stage2/loss/total"]] == [3, 4]
    assert [s for s, _ in scalars[f"eval/{task.main_metric}"]] == [2, 4]
    if task.name == "MNLI":
        assert "eval/mismatched/acc" in scalars


def test_stop_anywhere_and_resume_exactly(tmp_path: Path, world, capsys) -> None:
    """Stops in Stage 1 and in Stage 2 change nothing: same losses, same dev metrics, same export."""
    teacher = make_task_teacher(tmp_path / "teacher", "QQP")
    overrides = {"task__eval_every_n_steps": 1, "task__stage1": {"max_steps": 3, "lr": 1e-3},
                 "task__stage2": {"max_steps": 3, "lr": 1e-3}, "checkpoint": {"every_n_steps": 2, "keep_last": 1}}
    runs = {}
    for kind, stops in (("straight", ()), ("resumed", (2, 4))):
        (tmp_path / kind).mkdir()
        spec = task_spec(tmp_path / kind, teacher, "QQP", **overrides)
        outputs = [_run(spec, world, capsys, stop)[1] for stop in (*stops, None)]
        runs[kind] = tmp_path / kind / "out"
    stopped_1, stopped_2, finished = outputs
    assert "run stopped (resumable) at step 2" in stopped_1
    assert "run stopped (resumable) at step 4" in stopped_2 and "stage1/checkpoints/step00000002 at stage1 step 2" in stopped_2
    assert "stage1 already finished" in finished and "stage2/checkpoints/step00000001 at stage2 step 1" in finished
    assert _scalars(runs["resumed"]) == _scalars(runs["straight"])
    reports = [json.loads((runs[k] / "student" / "eval_results.json").read_text()) for k in ("straight", "resumed")]
    assert reports[0]["dev"] == reports[1]["dev"] and reports[0]["step"] == reports[1]["step"]

    # keep_last=1 keeps the newest checkpoint and the pinned best one
    for stage in ("stage1", "stage2"):
        ckpt = runs["resumed"] / stage / "checkpoints"
        best = json.loads((ckpt / "best.json").read_text())
        assert read_complete(ckpt / best["tag"])["step"] == best["step"]
        kept = sorted(p.name for p in ckpt.glob("step*"))
        assert kept == sorted({best["tag"], "step00000003"})

    # Stage 2 started from Stage 1's final weights, projections included
    stage1 = json.loads((runs["resumed"] / "stage1" / "result.json").read_text())
    spec = load_spec(tmp_path / "resumed" / "spec.json")
    teacher_model, _ = open_task(spec.task).load_teacher(str(teacher), "fp32")

    def module_factory(student):
        from mlkd_scale.losses import DistillationObjective
        from mlkd_scale.models.distillation_module import DistillationModule

        return DistillationModule(student, DistillationObjective(spec.losses, teacher_model.config, student.config, 2))

    module = stage2_module_from_stage1(teacher_model, module_factory, stage1)
    final = full_state_dict(Path(stage1["final"]["checkpoint"]))
    state = module.state_dict()
    assert any(k.startswith("objective.projections.") for k in state)
    assert all(torch.equal(state[k], final[k]) for k in state)


def test_finetune_a_teacher_then_distil_from_a_general_student(tmp_path: Path, world, capsys) -> None:
    """finetune_teacher's export is a task teacher; a bare encoder (general student) gets a fresh head."""
    from mlkd_scale.engine.task.context import evaluate_model_dir

    encoder = make_teacher(tmp_path / "encoder")
    spec = task_spec(tmp_path, encoder, "STS-B", path=tmp_path / "teacher.json",
                     run={"name": "ft", "output_dir": str(tmp_path / "ft"), "seed": 1}, task__eval_every_n_steps=1)
    result = run_finetune(load_spec(spec), dist=world)
    stdout = capsys.readouterr().out
    assert result["finished"] and "run finished at step 3" in stdout and "teacher exported to" in stdout
    teacher_dir = tmp_path / "ft" / "teacher"
    report = json.loads((teacher_dir / "eval_results.json").read_text())
    assert report["stage"] == "finetune" and set(report["dev"]["validation"]) == {"pearson", "spearman", "corr"}
    assert [s for s, _ in read_scalars(tmp_path / "ft" / "tensorboard")["finetune/loss/mse"]] == [1, 2, 3]
    reloaded = evaluate_model_dir(teacher_dir, load_spec(spec).task)
    assert reloaded["validation"] == pytest.approx(report["dev"]["validation"], abs=1e-5)

    general = tmp_path / "general_student"
    tokenizer = AutoTokenizer.from_pretrained(encoder)
    BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=24, num_hidden_layers=2, num_attention_heads=3,
                         intermediate_size=48, max_position_embeddings=64)).save_pretrained(general)
    kd_spec = task_spec(tmp_path, teacher_dir, "STS-B", path=tmp_path / "kd.json",
                        student={"init": "path", "path": str(general)}, task__stages=[2])
    result = run_task_kd(load_spec(kd_spec), dist=world)
    stdout = capsys.readouterr().out
    assert result["finished"] and "run finished at step 3" in stdout and list(result["stages"]) == ["stage2"]
    report = json.loads((tmp_path / "out" / "student" / "eval_results.json").read_text())
    assert report["teacher_dev"]["validation"] == pytest.approx(reloaded["validation"], abs=1e-5)
    student = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out" / "student")
    assert student.config.num_labels == 1 and student.config.hidden_size == 24

    # a relaunch of finished runs only reports (and re-exports)
    assert run_task_kd(load_spec(kd_spec), dist=world)["finished"]
    assert "stage2 already finished" in capsys.readouterr().out


@pytest.mark.parametrize("augment_stage2", [False, True])
def test_stage2_reads_the_augmentation_cache_only_when_asked(tmp_path: Path, world, capsys, augment_stage2) -> None:
    """TinyBERT distils the prediction layer on the augmented set too; task.augment_stage2 does that."""
    from task_fixtures import GLUE
    from test_task_data import _CopyAugmenter

    from mlkd_scale.data.augment.augmenter import augment_dataset
    from mlkd_scale.data.augment.inputs import read_examples

    preset = get_task("sst-2").augment
    examples = read_examples(GLUE / "SST-2" / "train.tsv", preset.text_a, preset.text_b, preset.label)
    augment_dataset(examples, tmp_path / "aug", _CopyAugmenter())  # 2 variants of every example
    teacher = make_task_teacher(tmp_path / "teacher", "SST-2")
    spec = task_spec(tmp_path, teacher, "SST-2", task__stages=[2], task__stage2={"epochs": 1, "lr": 1e-3},
                     task__augmented_dir=str(tmp_path / "aug"), task__augment_stage2=augment_stage2)
    result, stdout = _run(spec, world, capsys)
    steps_per_epoch = -(-len(examples) * (2 if augment_stage2 else 1) // 4)  # micro batch 4, one rank
    assert result["finished"] and f"run finished at step {steps_per_epoch}" in stdout
    assert ("Stage 2 too" in stdout) is augment_stage2
