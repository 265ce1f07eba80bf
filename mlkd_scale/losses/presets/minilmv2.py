"""The ``minilmv2`` preset: MiniLMv2's multi-head self-attention relation distillation.

* Stage 1: the queries (resp. keys, values) of all heads are concatenated and re-split into
  A_r = ``losses.relation_heads`` relation heads of width d/A_r; for each of Q-Q, K-K, V-V::

      R_a = softmax(X_a X_aᵀ / √(d/A_r)),   L_XX = 1/(A_r·|x|) Σ_a Σ_t KL(R^T_{a,t} ‖ R^S_{a,t})

  from one teacher layer (``losses.relation_teacher_layer``, default the last) into the student's
  last layer only (:func:`~mlkd_scale.losses.relation.mha_relation_loss` on the projections).
* Stage 2 (``losses.stage2_target``): 'kd' distils the teacher's logits (soft-label KD, MSE for
  regression); 'labels' fine-tunes on the labels as MiniLMv2's paper does for downstream tasks:
  the term ``ce`` (cross-entropy; MSE on the score for regression). Not for question answering.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from mlkd_scale.losses.prediction import label_loss
from mlkd_scale.losses.presets.base import _NONE, Preset, TermInputs, register_preset
from mlkd_scale.losses.relation import mha_relation_loss
from mlkd_scale.models.taps import TapRequest


@register_preset
class Minilmv2Preset(Preset):
    name = "minilmv2"
    terms: ClassVar[dict[int, tuple[str, ...]]] = {1: ("qq", "kk", "vv"), 2: ("kd", "ce")}
    reads = (
        "weights", "layer_mapping", "mask_padding", "relation_heads", "relation_teacher_layer",
        "stage2_target", "kd_temperature", "kd_scale_by_t2",
    )

    @property
    def teacher_layer(self) -> int:
        return self.spec.relation_teacher_layer or self.setup.teacher.num_hidden_layers

    def stage_terms(self) -> tuple[str, ...]:
        if self.setup.stage == 2:
            return ("ce",) if self.spec.stage2_target == "labels" else ("kd",)
        return self.terms[1]

    def check_shapes(self, weights: dict[str, float]) -> None:
        s, a = self.setup, self.spec.relation_heads
        if {"qq", "kk", "vv"} & set(weights) and (s.d_teacher % a or s.d_student % a):
            raise ValueError(
                f"losses.relation_heads = {a} must divide the teacher width {s.d_teacher} and the "
                f"student width {s.d_student}"
            )
        layers = s.teacher.num_hidden_layers
        if not 1 <= self.teacher_layer <= layers:
            raise ValueError(
                f"losses.relation_teacher_layer = {self.teacher_layer} is outside the teacher's layers 1..{layers}"
            )
        if "ce" in weights and s.qa:
            raise ValueError(
                "losses.stage2_target: 'labels' is not available for question answering (no class labels); use 'kd'"
            )

    def request(self, weights: dict[str, float], teacher: bool) -> TapRequest:
        layer = frozenset({self.teacher_layer if teacher else self.setup.num_student_layers})
        return TapRequest(
            qkv_layers=layer if {"qq", "kk", "vv"} & set(weights) else _NONE,
            logits="kd" in weights or ("ce" in weights and not teacher),
        )

    def _relation(self, x: TermInputs, part: int) -> torch.Tensor:
        mask = x.attention_mask if self.spec.mask_padding else None
        t_x = x.teacher.qkv[self.teacher_layer][part]
        s_x = x.student.qkv[self.setup.num_student_layers][part]
        return mha_relation_loss(t_x, s_x, mask, self.spec.relation_heads)

    def term_qq(self, x: TermInputs) -> torch.Tensor:
        return self._relation(x, 0)

    def term_kk(self, x: TermInputs) -> torch.Tensor:
        return self._relation(x, 1)

    def term_vv(self, x: TermInputs) -> torch.Tensor:
        return self._relation(x, 2)

    def term_kd(self, x: TermInputs) -> torch.Tensor:
        return self.soft_label_kd(x.teacher.logits, x.student.logits)

    def term_ce(self, x: TermInputs) -> torch.Tensor:
        return label_loss(x.student.logits, self.need_labels(x.labels, "ce"), self.setup.regression)
