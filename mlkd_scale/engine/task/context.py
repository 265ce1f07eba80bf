"""What teacher fine-tuning and task distillation share: setup (the task, its data, the plan), export, reports."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoTokenizer
from transformers import logging as hf_logging

from mlkd_scale.engine.checkpoints.files import atomic_write_text, claim_folder, read_json_record
from mlkd_scale.engine.distributed import DistInfo, init_distributed
from mlkd_scale.engine.export.hf_export import export_checkpoint
from mlkd_scale.engine.task.stage import TaskContext
from mlkd_scale.errors import DataError
from mlkd_scale.eval.dev import PredictFn, evaluate, format_metrics
from mlkd_scale.models import check_model_fit
from mlkd_scale.models.taps import head_logits
from mlkd_scale.spec import RunSpec, SpecError
from mlkd_scale.spec.plan import resolve_plan
from mlkd_scale.tasks.registry import open_task

EVAL_RESULTS = "eval_results.json"


def make_context(
    spec: RunSpec, stop_after_steps: int | None, dist: DistInfo | None, with_augmented: bool
) -> tuple[TaskContext, object]:
    """Join the process group, resolve the plan, read and encode the task's data; print both."""
    if spec.task is None:
        raise SpecError(
            "task: this spec has no task section (it is a general-distillation spec); "
            "run it with launchers/general_kd.py, or add a task section"
        )
    info = dist or init_distributed(spec.faults.collective_timeout_s)
    claim_folder(Path(spec.run.output_dir), spec.run.name, "run.output_dir")
    plan = resolve_plan(spec, info.world_size)
    hf_logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(spec.teacher.path)
    check_model_fit(spec, tokenizer)  # before the data is read and any model or engine is built
    try:
        data = open_task(spec.task).load_data(tokenizer, with_augmented=with_augmented)
    except (ValueError, OSError, RuntimeError) as error:  # file, label and cache problems: one line each
        raise DataError(f"task data: {error}") from None
    ctx = TaskContext(spec, info, plan, data.task, tokenizer, data.dev, stop_after_steps)
    stage2 = " (Stage 2 too: task.augment_stage2)" if spec.task.augment_stage2 and with_augmented else ""
    ctx.print(plan.summary(), data.describe() + stage2)
    return ctx, data


def export_best(ctx: TaskContext, result: dict, out_name: str, extra: dict | None = None) -> Path | None:
    """Export the stage's best checkpoint as a HF directory ``<output_dir>/<out_name>`` with
    ``eval_results.json`` (its dev metrics), on rank 0; every rank waits.

    None (nothing written) when ``checkpoint.export_at_end`` is false: ``mlkd-scale export`` can
    export the best checkpoint (named in the stage's result.json) later.
    """
    out_dir = ctx.output_dir / out_name
    best = result["best"]
    if not ctx.spec.checkpoint.export_at_end:
        ctx.print(f"not exported (checkpoint.export_at_end is false); the best checkpoint is {best['checkpoint']}")
        return None
    if ctx.dist.is_main:
        export_checkpoint(best["checkpoint"], out_dir, results=best["metrics"])
        report = {
            "task": ctx.task.name,
            "main_metric": ctx.task.main_metric,
            "stage": result["stage"],
            "step": best["step"],
            "checkpoint": best["checkpoint"],
            "dev": best["metrics"],
            **(extra or {}),
        }
        atomic_write_text(out_dir / EVAL_RESULTS, json.dumps(report, indent=1) + "\n")
    torch.distributed.barrier()
    return out_dir


def cached_dev_metrics(ctx: TaskContext, key: dict, predict: PredictFn, cache_name: str) -> dict:
    """Dev metrics of a fixed model (e.g. the teacher), computed once per run and cached by ``key``."""
    path = ctx.output_dir / cache_name
    cached = read_json_record(path)
    if cached is not None and cached.get("key") == key and isinstance(cached.get("dev"), dict):
        return cached["dev"]
    results = evaluate(predict, ctx.dev, ctx.task, ctx.spec.task.eval_batch_size, ctx.dist)
    if ctx.dist.is_main:
        atomic_write_text(path, json.dumps({"key": key, "dev": results}, indent=1) + "\n")
    return results


def print_stopped(ctx: TaskContext, run_step: int) -> dict:
    ctx.print(f"run stopped (resumable) at step {run_step}")
    return {"step": run_step, "finished": False}


def print_finished(ctx: TaskContext, run_step: int, lines: list[str]) -> None:
    ctx.print(f"run finished at step {run_step}", *lines)


def metrics_line(what: str, results: dict) -> str:
    return f"{what} dev: {format_metrics(results)}"


@torch.no_grad()
def evaluate_model_dir(model_dir: str | Path, task_spec, batch_size: int | None = None) -> dict:
    """Dev metrics of an exported model directory (teacher or student), in this one process.

    ``task_spec`` is a spec's task section (data_dir, max_seq_length; SQuAD's post-processing). The
    directory is loaded as the task loads a teacher (its head class; logits put in our label order
    via the model's ``id2label``, as the run did).
    """
    task = open_task(task_spec)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = task.load_data(tokenizer, with_augmented=False)
    model, order = task.load_teacher(str(model_dir), "fp32")
    info = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))

    def predict(inputs: dict) -> torch.Tensor:
        logits = head_logits(model(**inputs))
        return logits if order is None else logits[:, order]

    return evaluate(predict, data.dev, task, batch_size or task_spec.eval_batch_size, info)
