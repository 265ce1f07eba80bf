"""The module DeepSpeed trains: the student plus the objective's projections (never the teacher)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import PreTrainedModel

from mlkd_scale.models import Features, FeatureTap

if TYPE_CHECKING:
    from mlkd_scale.losses import DistillationObjective

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class DistillationModule(nn.Module):
    """``student`` and ``objective`` as children, so both are optimised and checkpointed together.

    The teacher's features are an input of :meth:`forward`: the teacher lives outside this module,
    outside the optimizer and outside every checkpoint. ``batch`` holds the model inputs and, for
    SQuAD, ``span_mask`` (the positions the start/end distributions are distilled over).
    """

    def __init__(self, student: PreTrainedModel, objective: DistillationObjective):
        super().__init__()
        self.student = student
        self.objective = objective
        self._tap = FeatureTap(student, objective.student_request())

    def forward(
        self, batch: dict[str, torch.Tensor], teacher_features: Features, labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        student_features = self._tap(**{k: batch[k] for k in MODEL_INPUTS if k in batch})
        return self.objective(
            teacher_features, student_features, batch.get("attention_mask"), labels, batch.get("span_mask")
        )


def compile_for_speed(mode: str, teacher: nn.Module, module: DistillationModule, teacher_placement: str) -> None:
    """Apply ``train.compile`` in place (``nn.Module.compile``: state-dict keys stay the same).

    'objective' compiles the losses and projections; 'all' also the student and, when it is
    replicated, the teacher (a ZeRO-3 teacher gathers its parameters in hooks that are left eager).
    """
    if mode == "off":
        return
    module.objective.compile()
    if mode == "all":
        module.student.compile()
        if teacher_placement == "replicate":
            teacher.compile()
