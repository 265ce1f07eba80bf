"""The sequence-classification side of teacher fine-tuning (GLUE): the supervised loss of the head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from mlkd_scale.models.distillation_module import MODEL_INPUTS


class SupervisedModule(nn.Module):
    """The model being fine-tuned, with its supervised loss: cross-entropy over the classes, or
    ``MSE(score, label)`` for a regression task (STS-B).

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
