"""Fine-tuning the task teacher: a pre-trained encoder plus a fresh classification head, supervised.

``teacher.path`` is the pre-trained encoder (e.g. BERT-base); the head gets the task's labels in
our order (:func:`~mlkd_scale.engine.task.context.label_config`), so the exported teacher needs no
logit re-ordering. The loss is cross-entropy (MSE on the single score for STS-B). It runs as one
stage named ``finetune`` of the task machinery — same engine, checkpoints, resume, dev evaluation
and best-checkpoint pinning — with the budget ``task.finetune``, and exports the best checkpoint
by the task's main metric to ``<output_dir>/teacher`` (``AutoModelForSequenceClassification``
loads it; ``eval_results.json`` holds its dev metrics).

SQuAD: the head is a question-answering head (``AutoModelForQuestionAnswering`` loads the export),
the loss the mean of the start and end cross-entropies (:mod:`mlkd_scale.models.qa_head`), and
checkpoints are selected on dev F1 (or EM, ``task.squad.selection_metric``).
"""

from __future__ import annotations

import deepspeed
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForSequenceClassification, PreTrainedModel

from mlkd_scale.engine.distributed import DistInfo
from mlkd_scale.engine.task.context import (
    export_best,
    label_config,
    make_context,
    metrics_line,
    print_finished,
    print_stopped,
)
from mlkd_scale.engine.task.stage import StageSetup, TaskStage
from mlkd_scale.models.distillation_module import MODEL_INPUTS
from mlkd_scale.models.qa_head import SpanSupervisedModule, qa_model_for_finetuning
from mlkd_scale.models.taps import head_logits
from mlkd_scale.spec import RunSpec
from mlkd_scale.tasks.squad.task import is_squad_task

NAME = "finetune"


class SupervisedModule(nn.Module):
    """The model being fine-tuned, with its supervised loss.

    The model is the ``student`` attribute because that is the prefix export takes a checkpoint's
    model from (:mod:`mlkd_scale.engine.export.hf_export`); here it is the future teacher.
    """

    def __init__(self, model: PreTrainedModel, regression: bool):
        super().__init__()
        self.student = model
        self.regression = regression

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = self.student(**{k: batch[k] for k in MODEL_INPUTS}).logits.float()
        if self.regression:
            loss = F.mse_loss(logits.squeeze(-1), batch["labels"].float())
            return loss, {"mse": loss.detach()}
        loss = F.cross_entropy(logits, batch["labels"])
        return loss, {"ce": loss.detach()}


def run_finetune(spec: RunSpec, stop_after_steps: int | None = None, dist: DistInfo | None = None) -> dict:
    """Fine-tune (or resume), then export the best checkpoint to ``<output_dir>/teacher``."""
    ctx, data = make_context(spec, stop_after_steps, dist, with_augmented=False)
    result = ctx.read_result(NAME)
    if result is None:
        deepspeed.runtime.utils.set_random_seed(spec.run.seed)  # the same fresh head on every rank
        if is_squad_task(ctx.task):
            model = qa_model_for_finetuning(spec.teacher.path)
            module = SpanSupervisedModule(model)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(
                spec.teacher.path, dtype=torch.float32, ignore_mismatched_sizes=True, **label_config(ctx.task)
            )
            module = SupervisedModule(model, ctx.task.is_regression)
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
