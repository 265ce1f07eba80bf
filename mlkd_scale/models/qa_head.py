"""The question-answering side of teacher fine-tuning and task distillation (SQuAD).

What differs from GLUE is only the head: ``AutoModelForQuestionAnswering`` (a linear layer giving a
start and an end logit per token), its supervised loss, and what a prediction is (the stacked
start/end logits ``[B, 2, L]``, :func:`~mlkd_scale.models.taps.head_logits`). The stages, data
order, checkpoints, evaluation and export are the GLUE machinery's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForQuestionAnswering, PreTrainedModel

from mlkd_scale.models.distillation_module import MODEL_INPUTS
from mlkd_scale.models.teacher import DTYPES, freeze
from mlkd_scale.spec import SpecError


class SpanSupervisedModule(nn.Module):
    """A QA model being fine-tuned (as ``student``, the prefix export reads), with its loss.

    ``L = (CE(start logits, start_positions) + CE(end logits, end_positions)) / 2`` over all ``L``
    positions of the window, as ``BertForQuestionAnswering`` computes it; a window without the
    answer (and every v2.0 unanswerable question) has both positions at [CLS] (index 0).
    """

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        self.student = model

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = self.student(**{k: batch[k] for k in MODEL_INPUTS if k in batch})
        start = F.cross_entropy(out.start_logits.float(), batch["start_positions"])
        end = F.cross_entropy(out.end_logits.float(), batch["end_positions"])
        loss = (start + end) / 2
        return loss, {"start_ce": start.detach(), "end_ce": end.detach()}


def qa_model_for_finetuning(path: str) -> PreTrainedModel:
    """The pre-trained encoder at ``path`` with a QA head (fresh unless ``path`` already has one), fp32."""
    return AutoModelForQuestionAnswering.from_pretrained(path, dtype=torch.float32)


def load_qa_teacher(path: str, dtype: str) -> PreTrainedModel:
    """The frozen fine-tuned QA teacher; a model without a trained QA head is a spec error."""
    teacher, info = AutoModelForQuestionAnswering.from_pretrained(path, dtype=DTYPES[dtype], output_loading_info=True)
    fresh = [k for k in info.get("missing_keys", []) if "qa_outputs" in k]
    if fresh:
        raise SpecError(
            f"teacher.path: {path} has no trained question-answering head (e.g. {min(fresh)} is missing); "
            "SQuAD distillation needs a fine-tuned QA teacher: make one with launchers/finetune_teacher.py"
        )
    if teacher.config.num_labels != 2:
        raise SpecError(
            f"teacher.path: {path} has a QA head with {teacher.config.num_labels} outputs per token, not 2 "
            "(start, end); give a SQuAD-fine-tuned teacher"
        )
    return freeze(teacher)
