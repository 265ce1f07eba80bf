"""The ``distilbert`` preset (loss side): DistilBERT's triple loss, as its distiller computes it.

Reference: huggingface/transformers, ``examples/research_projects/distillation/distiller.py``
(``Distiller.step``) and the training command of that folder's README (``--alpha_ce 5.0
--alpha_mlm 2.0 --alpha_cos 1.0 --temperature 2.0``), which give this preset's default weights
(kd 5.0, mlm 2.0, cos 1.0 at Stage 1) and its default ``losses.kd_temperature`` (2.0).

* Stage 1 (masked-LM distillation; the models are ``...ForMaskedLM``, ``Features.logits`` are the
  MLM logits z [B, L, V] and ``labels`` the MLM labels y [B, L], −100 on unmasked tokens)::

      kd  = τ² · (1/|R|) Σ_{(b,i) ∈ R} KL(softmax(z^T_{b,i}/τ) ‖ softmax(z^S_{b,i}/τ))
            R = the real tokens (attention mask; the distiller's restrict_ce_to_mask=False),
            i.e. KLDivLoss(reduction='batchmean') over the selected rows, times τ²
      mlm = CrossEntropyLoss(ignore_index=-100)(z^S, y)          mean over the masked tokens
      cos = CosineEmbeddingLoss()(h^S_L, h^T_M, 1) = (1/|R|) Σ_{(b,i) ∈ R} (1 − cos(h^S, h^T))
            over the last hidden states of the real tokens

* Stage 2 (task distillation): kd on the task logits (soft-label KD, τ²; MSE for regression) + cos.

When the student is narrower than the teacher, one Linear(d_S, d_T) projects its last hidden
state for cos (DistilBERT itself has equal widths and no projection).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from mlkd_scale.losses.feature import hidden_cosine_loss
from mlkd_scale.losses.prediction import masked_lm_loss, prediction_kd_loss
from mlkd_scale.losses.presets.base import _NONE, Preset, TermInputs, register_preset
from mlkd_scale.models.taps import TapRequest


@register_preset
class DistilbertPreset(Preset):
    name = "distilbert"
    terms: ClassVar[dict[int, tuple[str, ...]]] = {1: ("kd", "mlm", "cos"), 2: ("kd", "cos")}
    masked_lm_terms: ClassVar[dict[int, frozenset[str]]] = {1: frozenset({"kd", "mlm"})}
    default_weights: ClassVar[dict[int, dict[str, float]]] = {1: {"kd": 5.0, "mlm": 2.0, "cos": 1.0}}
    default_kd_temperature = 2.0
    reads = ("weights", "layer_mapping", "kd_temperature", "kd_scale_by_t2")

    def num_projections(self) -> int:
        return 1 if self.setup.d_student != self.setup.d_teacher else 0

    def used_projections(self, weights: dict[str, float], count: int) -> set[int]:
        return {0} if count and "cos" in weights else set()

    def request(self, weights: dict[str, float], teacher: bool) -> TapRequest:
        return TapRequest(
            hidden_layers=frozenset({self.last_layer(teacher)}) if "cos" in weights else _NONE,
            logits="kd" in weights or ("mlm" in weights and not teacher),
        )

    def term_kd(self, x: TermInputs) -> torch.Tensor:
        t, s = x.teacher.logits, x.student.logits
        if self.setup.stage == 2:
            return self.soft_label_kd(t, s)
        self._check_mlm_logits(s, x.attention_mask)
        real = torch.ones(s.shape[:2], dtype=torch.bool, device=s.device) if x.attention_mask is None else x.attention_mask.bool()
        scale = 1.0 if self.spec.kd_scale_by_t2 else self.kd_temperature**-2
        return prediction_kd_loss(t[real], s[real], self.kd_temperature) * scale

    def term_mlm(self, x: TermInputs) -> torch.Tensor:
        labels = self.need_labels(x.labels, "mlm", "the masked-LM labels [B, L] (-100 on unmasked tokens)")
        self._check_mlm_logits(x.student.logits, labels)
        return masked_lm_loss(x.student.logits, labels)

    def term_cos(self, x: TermInputs) -> torch.Tensor:
        s_last = x.student.hidden[self.setup.num_student_layers]
        if self.num_projections():
            s_last = x.project(0, s_last)
        return hidden_cosine_loss(x.teacher.hidden[self.setup.layer_map[-1]], s_last, x.attention_mask)

    @staticmethod
    def _check_mlm_logits(logits: torch.Tensor, tokens: torch.Tensor | None) -> None:
        if logits.dim() != 3 or (tokens is not None and tuple(tokens.shape) != tuple(logits.shape[:2])):
            raise ValueError(
                f"the distilbert preset's stage 1 reads masked-LM logits [B, L, V] and labels [B, L]; got logits of "
                f"shape {tuple(logits.shape)}: the teacher and the student need a masked-LM head (...ForMaskedLM)"
            )
