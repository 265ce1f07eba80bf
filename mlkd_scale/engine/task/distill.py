"""Task distillation (paper §1, §3): a fine-tuned task teacher teaches the student, Stage 1 then Stage 2.

Reading order: :func:`run_task_kd` loads the teacher, the data and the dev metrics of the teacher,
then runs each stage of ``task.stages`` with :class:`~mlkd_scale.engine.task.stage.TaskStage`:

* Stage 1 — L_EMB + L_MHA + L_FFN (or the preset's stage-1 terms) on the task's train data (or
  its augmentation cache); trains the student and the projections W_h;
* Stage 2 — L_SS + L_SC + L_KD on the original train data (the augmentation cache with
  ``task.augment_stage2``), labels passed for L_SC; it starts from
  Stage 1's *final* weights, projections included (the consolidated Stage-1 checkpoint is loaded
  into the Stage-2 module before DeepSpeed wraps it, so it does not matter whether Stage 1 ran in
  this process or in an earlier launch).

The teacher's features for each stage are computed once, before its first step, and read back by
sample index in every epoch (``teacher.cache``, :mod:`~mlkd_scale.engine.task.teacher_cache`), unless they
exceed ``teacher.cache_max_gib``: then that stage runs the live teacher on every batch.

A finished stage (its ``result.json``) is skipped on relaunch; an unfinished one resumes exactly.
At the end the best checkpoint of the last stage (Stage 2 normally), chosen on dev by the task's
main metric, is exported with its head to ``<output_dir>/student`` with ``eval_results.json``.

SQuAD runs the same stages on doc-stride windows with a QA teacher and student (the student is
built with the teacher's class, ``...ForQuestionAnswering``): Stage 1 unchanged; Stage 2 distils
the start and end distributions over [CLS] and the context tokens (``span_mask``), with L_SS on
[CLS] and L_SC off (no class labels; see :mod:`mlkd_scale.losses.objective`). Dev scores are the
official EM/F1 after post-processing, checkpoints are selected on F1 (or EM).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import deepspeed
import torch
from transformers import AutoConfig, PreTrainedModel

from mlkd_scale.engine.checkpoints.manager import HF_META
from mlkd_scale.engine.distributed import DistInfo
from mlkd_scale.engine.task.context import (
    cached_dev_metrics,
    export_best,
    make_context,
    metrics_line,
    print_finished,
    print_stopped,
)
from mlkd_scale.engine.task.stage import (
    StageSetup,
    TaskContext,
    TaskStage,
    full_state_dict,
)
from mlkd_scale.engine.task.teacher_cache import TeacherCache, open_teacher_cache, teacher_fingerprint
from mlkd_scale.engine.teacher_placement import place_teacher
from mlkd_scale.errors import CheckpointError
from mlkd_scale.losses import DistillationObjective
from mlkd_scale.models import FeatureTap, build_student, resolve_init_layers, resolve_layer_mapping
from mlkd_scale.models.distillation_module import MODEL_INPUTS, DistillationModule, compile_for_speed
from mlkd_scale.models.taps import head_logits
from mlkd_scale.spec import RunSpec, SpecError, teacher_fit_problems
from mlkd_scale.tasks.base import Task


def build_task_student(
    teacher: PreTrainedModel, ctx: TaskContext, layer_map: list[int], order: list[int] | None
) -> PreTrainedModel:
    """The student with the teacher's head class and the task's labels (in our order).

    ``init='path'`` loads e.g. a general-distillation export (a bare encoder gets a fresh head);
    ``teacher_layers`` copies the teacher's head too, its rows permuted into our label order.
    """
    spec = ctx.spec.student
    labels = ctx.task.label_config()
    if spec.init == "path":
        return type(teacher).from_pretrained(
            spec.path, dtype=torch.float32, ignore_mismatched_sizes=True, **labels
        )
    problems = teacher_fit_problems(ctx.spec, teacher.config.to_dict(), f"teacher.path {ctx.spec.teacher.path}")
    if problems:
        raise SpecError(problems)
    init_layers = resolve_init_layers(spec, ctx.spec.losses.preset, layer_map, teacher.config.num_hidden_layers)
    student = build_student(teacher, spec, init_layers)
    for key, value in labels.items():
        setattr(student.config, key, value)
    if spec.init == "teacher_layers" and order is not None:  # the copied head's output rows
        outputs = [m for m in student.modules() if isinstance(m, torch.nn.Linear) and m.out_features == len(order)]
        with torch.no_grad():
            for param in outputs[-1].parameters():
                param.copy_(param[order])
    return student


def stage2_module_from_stage1(teacher: PreTrainedModel, module_factory, stage1: dict) -> DistillationModule:
    """The Stage-2 module with Stage 1's final weights: the student and every projection."""
    final = Path(stage1["final"]["checkpoint"])
    config = AutoConfig.from_pretrained(final.parent / HF_META)
    module = module_factory(type(teacher)(config).float())
    state = full_state_dict(final)
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing_student = [k for k in missing if k.startswith("student.")]
    if missing_student or unexpected:
        raise CheckpointError(
            f"Stage 1's checkpoint {final} does not fit the Stage-2 student: missing {missing_student[:3]}, "
            f"unexpected {unexpected[:3]}; was Stage 1 run with another student or losses section?"
        )
    return module


def teacher_dev_metrics(ctx: TaskContext, teacher: PreTrainedModel, order: list[int] | None) -> dict:
    """The teacher's dev metrics (computed once per run, cached in ``teacher_eval.json``), printed."""
    spec = ctx.spec

    def teacher_logits(inputs: dict) -> torch.Tensor:
        logits = head_logits(teacher(**inputs))
        return logits if order is None else logits[:, order]

    key = {"teacher": str(Path(spec.teacher.path).absolute()), "max_seq_length": spec.task.max_seq_length}
    key.update(ctx.task.teacher_eval_key())
    teacher_dev = cached_dev_metrics(ctx, key, teacher_logits, "teacher_eval.json")
    ctx.print(metrics_line("teacher", teacher_dev))
    return teacher_dev


def stage_loss(task: Task, tap: FeatureTap, cache: TeacherCache | None, order: list[int] | None):
    """``make_loss(engine)`` of a distillation stage: the teacher's features of each micro batch from
    the stage's teacher cache by sample index (:mod:`~mlkd_scale.engine.task.teacher_cache`) or, without
    one, from the live teacher through ``tap``; logits put in our label order; the engine's objective
    on what the task's losses read (:meth:`~mlkd_scale.tasks.base.Task.loss_inputs`)."""

    def make_loss(engine):
        def loss(batch: dict):
            inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
            if cache is not None:
                features = cache.features(batch["index"])
            else:
                with torch.no_grad():  # not inference_mode: losses keep teacher tensors for backward
                    features = tap(**inputs)
            if order is not None and features.logits is not None:
                features.logits = features.logits[:, order]
            inputs, labels = task.loss_inputs(batch, inputs)
            return engine(inputs, features, labels)

        return loss

    return make_loss


@dataclass
class TaskTeacher:
    """The run's frozen task teacher and what every stage reads of it."""

    model: PreTrainedModel
    order: list[int] | None  # logits -> our label order (None: already)
    layer_map: list[int]  # student layer -> teacher layer
    fingerprint: str | None  # the teacher cache's key (None without a cache)


def stage_module(ctx: TaskContext, teacher: TaskTeacher, number: int, student: PreTrainedModel) -> DistillationModule:
    """The module a distillation stage trains: ``student`` with the stage's objective (and projections)."""
    spec, task = ctx.spec, ctx.task
    objective = DistillationObjective(
        spec.losses, teacher.model.config, student.config, stage=number, regression=task.is_regression,
        qa=task.span_logits,
    )
    module = DistillationModule(student, objective)
    compile_for_speed(spec.train.compile, teacher.model, module, spec.teacher.placement)
    return module


def distil_stage(ctx: TaskContext, teacher: TaskTeacher, number: int, train, offset: int, stage1: dict | None) -> dict:
    """Run (or resume) Stage ``number`` from run step ``offset``: ``{"step", "finished", "result"}``.

    Stage 2 starts from Stage 1's final weights when Stage 1 ran (``stage1``, its result)."""
    spec, name = ctx.spec, f"stage{number}"
    deepspeed.runtime.utils.set_random_seed(spec.run.seed)  # each stage starts from the same RNG state
    try:
        if number == 2 and stage1 is not None:
            module = stage2_module_from_stage1(
                teacher.model, lambda student: stage_module(ctx, teacher, number, student), stage1
            )
        else:
            student = build_task_student(teacher.model, ctx, teacher.layer_map, teacher.order)
            module = stage_module(ctx, teacher, number, student)
    except ValueError as error:  # student sizes vs teacher, loss settings vs widths: the user's to fix
        raise SpecError(str(error)) from None
    tap = FeatureTap(teacher.model, module.objective.teacher_request())
    cache = open_teacher_cache(ctx, name, tap, train, teacher.fingerprint) if spec.teacher.cache else None
    if not spec.teacher.cache:
        ctx.print(f"{name}: live teacher (teacher.cache is false)")
    setup = StageSetup(
        name=name,
        module=module,
        make_loss=stage_loss(ctx.task, tap, cache, teacher.order),
        make_predict=lambda engine: (lambda inputs: head_logits(engine.module.student(**inputs))),
        train=train,
        budget=spec.task.stage1 if number == 1 else spec.task.stage2,
        stream=number,
        step_offset=offset,
    )
    stage = TaskStage(ctx, setup, module.student)
    outcome = stage.run()
    stage.close()
    tap.remove()
    return outcome


def run_task_kd(spec: RunSpec, stop_after_steps: int | None = None, dist: DistInfo | None = None) -> dict:
    """Run (or resume) every stage of ``spec.task.stages``, then export the best student."""
    ctx, data = make_context(spec, stop_after_steps, dist, with_augmented=True)
    task, device = ctx.task, ctx.dist.device
    model, order = task.load_teacher(spec.teacher.path, spec.teacher.dtype)
    fingerprint = teacher_fingerprint(model, device) if spec.teacher.cache else None  # before placement
    placed_teacher = place_teacher(model, spec.teacher, ctx.plan, device)
    ctx.print(placed_teacher.describe())
    teacher_dev = teacher_dev_metrics(ctx, model, order)
    layer_map = resolve_layer_mapping(spec.losses.layer_mapping, spec.student.num_layers, model.config.num_hidden_layers)
    teacher = TaskTeacher(model, order, layer_map, fingerprint)

    offset, result, results = 0, None, {}
    for number in spec.task.stages:
        name = f"stage{number}"
        done = ctx.read_result(name)
        if done is not None:
            ctx.print(f"{name} already finished ({ctx.stage_dir(name) / 'result.json'}); skipping it")
        elif stop_after_steps is not None and stop_after_steps <= offset:
            return print_stopped(ctx, offset)
        else:
            train = data.stage1_train if number == 1 or spec.task.augment_stage2 else data.train
            outcome = distil_stage(ctx, teacher, number, train, offset, results.get("stage1"))
            if not outcome["finished"]:
                return print_stopped(ctx, offset + outcome["step"])
            done = outcome["result"]
        offset, result = offset + done["steps"], done
        results[name] = done
    return finish_run(ctx, offset, result, results, teacher_dev)


def finish_run(ctx: TaskContext, offset: int, result: dict, results: dict, teacher_dev: dict) -> dict:
    """Export the last stage's best student and print (and return) the run's summary."""
    out_dir = export_best(ctx, result, "student", {"teacher_dev": teacher_dev})
    lines = [metrics_line("teacher", teacher_dev)]
    for name, res in results.items():
        if res.get("first_loss") is not None:
            lines.append(f"{name} loss: {res['first_loss']:.4f} at the first logged step -> {res['last_loss']:.4f}")
    lines += [
        metrics_line(f"student ({result['stage']} step {result['best']['step']})", result["best"]["metrics"]),
    ]
    if out_dir is not None:
        lines.append(f"student exported to {out_dir}")
    print_finished(ctx, offset, lines)
    exported = str(out_dir) if out_dir else None
    return {"step": offset, "finished": True, "stages": results, "teacher_dev": teacher_dev, "exported": exported}
