"""The ``tinybert`` preset: TinyBERT's losses as its paper (§3.1) and its authors' code compute them.

Reference: huawei-noah/Pretrained-Language-Model, ``TinyBERT/task_distill.py`` (intermediate-layer
and prediction-layer distillation) and ``TinyBERT/general_distill.py``; ``transformer/modeling.py``
holds the student's single ``fit_dense``.

* Stage 1, with g the uniform mapping and ``fit_dense`` W one Linear(d_S, d_T) shared by the
  embeddings and every layer (``losses.projection`` None = 'shared'; 'per_layer' gives the
  embeddings index 0 and student layer n index n)::

      emb    = MSELoss()(E^S W, E^T)                                  mean over all B·L·d_T elements
      hidden = Σ_n MSELoss()(H^S_n W, H^T_g(n))
      attn   = Σ_n MSELoss()(A'^S_n, A'^T_g(n)),  A = QKᵀ/√d_k + mask, A' = where(A ≤ −100, 0, A)

  The attention scores are the unnormalised ones, taken from the mapped layers only (SDPA stays
  on elsewhere, :mod:`~mlkd_scale.models.selective_attention`); equal head counts are required.
  Nothing is masked otherwise: padded positions count in every mean, as in the official code
  (``losses.mask_padding`` is not read).
* Stage 2: ``soft_cross_entropy(z^S/τ, z^T/τ)`` = mean over B·C of −softmax(z^T/τ)·log_softmax(z^S/τ),
  no τ² (:func:`~mlkd_scale.losses.prediction.soft_cross_entropy_loss`); for regression the code
  fits the labels, MSE(z^S, y), and so does this preset.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from mlkd_scale.losses.feature import attention_score_mse_loss, hidden_mse_loss
from mlkd_scale.losses.prediction import label_loss, soft_cross_entropy_loss
from mlkd_scale.losses.presets.base import _NONE, Preset, TermInputs, register_preset
from mlkd_scale.models.taps import TapRequest


@register_preset
class TinybertPreset(Preset):
    name = "tinybert"
    terms: ClassVar[dict[int, tuple[str, ...]]] = {1: ("emb", "attn", "hidden"), 2: ("kd",)}
    default_projection = "shared"
    reads = ("weights", "layer_mapping", "projection", "kd_temperature")

    def check_shapes(self, weights: dict[str, float]) -> None:
        t_heads, s_heads = self.setup.teacher.num_attention_heads, self.setup.student.num_attention_heads
        if "attn" in weights and t_heads != s_heads:
            raise ValueError(
                f"the tinybert preset's attention loss needs equal head counts (teacher {t_heads}, student "
                f"{s_heads}); use the mlkd preset, whose MHA relation works with any head count"
            )

    def num_projections(self) -> int:
        return 1 if self.projection == "shared" else self.setup.num_student_layers + 1

    def used_projections(self, weights: dict[str, float], count: int) -> set[int]:
        if count == 1:
            return {0} if {"emb", "hidden"} & set(weights) else set()
        return ({0} if "emb" in weights else set()) | (set(range(1, count)) if "hidden" in weights else set())

    def request(self, weights: dict[str, float], teacher: bool) -> TapRequest:
        layers = self.mapped_layers(teacher)
        return TapRequest(
            embeddings="emb" in weights,
            hidden_layers=layers if "hidden" in weights else _NONE,
            attention_scores_layers=layers if "attn" in weights else _NONE,
            logits="kd" in weights and not (teacher and self.setup.regression),
        )

    def term_emb(self, x: TermInputs) -> torch.Tensor:
        return hidden_mse_loss(x.teacher.embeddings, x.project(0, x.student.embeddings))

    def term_hidden(self, x: TermInputs) -> torch.Tensor:
        t, s = x.teacher.hidden, x.student.hidden
        return sum(hidden_mse_loss(t[m], x.project(n, s[n])) for n, m in self.setup.pairs)

    def term_attn(self, x: TermInputs) -> torch.Tensor:
        t, s = x.teacher.attention_scores, x.student.attention_scores
        return sum(attention_score_mse_loss(t[m], s[n]) for n, m in self.setup.pairs)

    def term_kd(self, x: TermInputs) -> torch.Tensor:
        if self.setup.regression:
            return label_loss(x.student.logits, self.need_labels(x.labels, "kd (regression)"), regression=True)
        return soft_cross_entropy_loss(x.teacher.logits, x.student.logits, self.kd_temperature)
