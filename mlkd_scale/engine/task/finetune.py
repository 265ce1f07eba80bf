"""Fine-tuning the task teacher: a pre-trained encoder plus a fresh head of the task, supervised.

``teacher.path`` is the pre-trained encoder (e.g. BERT-base); the task gives the head and its loss
(:meth:`~mlkd_scale.tasks.base.Task.finetune_module`: GLUE a classification head with the task's
labels in our order, so the exported teacher needs no logit re-ordering, and cross-entropy, or MSE
on STS-B's single score; SQuAD a question-answering head and the mean of the start and end
cross-entropies). It runs as one stage named ``finetune`` of the task machinery — same engine,
checkpoints, resume, dev evaluation and best-checkpoint pinning — with the budget
``task.finetune``, and exports the best checkpoint by the task's main metric to
``<output_dir>/teacher`` (the task's ``head_class`` loads it; ``eval_results.json`` holds its dev
metrics).
"""

from __future__ import annotations

import deepspeed

from mlkd_scale.engine.distributed import DistInfo
from mlkd_scale.engine.task.context import (
    export_best,
    make_context,
    metrics_line,
    print_finished,
    print_stopped,
)
from mlkd_scale.engine.task.stage import StageSetup, TaskStage
from mlkd_scale.models.taps import head_logits
from mlkd_scale.spec import RunSpec

NAME = "finetune"


def run_finetune(spec: RunSpec, stop_after_steps: int | None = None, dist: DistInfo | None = None) -> dict:
    """Fine-tune (or resume), then export the best checkpoint to ``<output_dir>/teacher``."""
    ctx, data = make_context(spec, stop_after_steps, dist, with_augmented=False)
    result = ctx.read_result(NAME)
    if result is None:
        deepspeed.runtime.utils.set_random_seed(spec.run.seed)  # the same fresh head on every rank
        model, module = ctx.task.finetune_module(spec.teacher.path)
        setup = StageSetup(
            name=NAME,
            module=module,
            make_loss=lambda engine: engine,
            make_predict=lambda engine: (lambda inputs: head_logits(engine.module.student(**inputs))),
            train=data.train,
            budget=spec.task.finetune,
            stream=0,
        )
        stage = TaskStage(ctx, setup, model)
        outcome = stage.run()
        stage.close()
        if not outcome["finished"]:
            return print_stopped(ctx, outcome["step"])
        result = outcome["result"]
    else:
        ctx.print(f"{NAME} already finished ({ctx.stage_dir(NAME) / 'result.json'}); exporting its best checkpoint")
    out_dir = export_best(ctx, result, "teacher")
    lines = [metrics_line(f"teacher (step {result['best']['step']})", result["best"]["metrics"])]
    if out_dir is not None:
        lines.append(f"teacher exported to {out_dir}")
    print_finished(ctx, result["steps"], lines)
    exported = str(out_dir) if out_dir else None
    return {"step": result["steps"], "finished": True, "result": result, "exported": exported}
