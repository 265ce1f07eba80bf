"""The distillation objective: the spec's loss section turned into a weighted sum of loss terms.

The objective owns what is trained besides the student (the student→teacher projections W_h),
says which features each model must expose (:class:`TapRequest`), and computes every active term
of one stage. Presets:

* ``mlkd`` (the paper) — stage 1: L_EMB + L_MHA + L_FFN; stage 2: L_SS + L_SC + L_KD
  (L_KD is an MSE for regression; L_SC is off or on binned scores for regression).
* ``tinybert`` — stage 1: embedding MSE, attention-probability MSE, hidden MSE (projected);
  stage 2: soft cross-entropy. Needs equal head counts; the attention maps are computed
  in the mapped layers only (:mod:`~mlkd_scale.models.selective_attention`).
* ``minilmv2`` — stage 1: Q-Q, K-K, V-V relations over A_r relation heads, one teacher layer into
  the student's last layer; stage 2: KD.
* ``distilbert`` — stage 1: cosine loss on the last hidden states; stage 2: KD·τ² + cosine.

Question answering (``qa=True``, SQuAD): the logits are the stacked start/end logits ``[B, 2, L]``
and the prediction loss distils both distributions over the valid positions only (formula in
:func:`~mlkd_scale.losses.prediction.mask_span_logits`); L_SS works on [CLS] as for GLUE; L_SC
contrasts samples by class label, which QA has none of, so it is off (a weight > 0 for ``sc`` is
an error rather than a silent no-op).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from transformers import PretrainedConfig

from mlkd_scale.losses.contrastive import sample_contrastive_loss
from mlkd_scale.losses.feature import attention_mse_loss, hidden_cosine_loss, hidden_mse_loss
from mlkd_scale.losses.prediction import (
    mask_span_logits,
    prediction_kd_loss,
    prediction_mse_loss,
    soft_cross_entropy_loss,
)
from mlkd_scale.losses.relation import embedding_relation_loss, mha_relation_loss, sample_similarity_loss
from mlkd_scale.models.mapping import resolve_layer_mapping
from mlkd_scale.models.taps import Features, TapRequest
from mlkd_scale.spec import LossesSpec

PRESET_TERMS: dict[str, dict[int, tuple[str, ...]]] = {
    "mlkd": {1: ("emb", "mha", "ffn"), 2: ("ss", "sc", "kd")},
    "tinybert": {1: ("emb", "attn", "hidden"), 2: ("kd",)},
    "minilmv2": {1: ("qq", "kk", "vv"), 2: ("kd",)},
    "distilbert": {1: ("cos",), 2: ("kd", "cos")},
}


class DistillationObjective(nn.Module):
    """Weighted sum of one preset's loss terms for one stage; holds the trainable projections.

    ``forward(teacher_features, student_features, attention_mask, labels, span_mask)`` returns
    ``(total, terms)`` where ``terms`` maps each active term name to its detached, unweighted value.
    ``span_mask`` (QA only) marks the positions the start/end distributions are taken over; without
    one, QA uses the attention mask (every non-padding token).
    """

    def __init__(
        self,
        losses: LossesSpec,
        teacher_config: PretrainedConfig,
        student_config: PretrainedConfig,
        stage: int = 1,
        regression: bool = False,
        qa: bool = False,
    ):
        super().__init__()
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, not {stage}")
        self.spec = losses
        self.stage = stage
        self.regression = regression
        self.qa = qa
        self.d_teacher = teacher_config.hidden_size
        self.d_student = student_config.hidden_size
        self.num_student_layers = student_config.num_hidden_layers
        self.layer_map = resolve_layer_mapping(
            losses.layer_mapping, student_config.num_hidden_layers, teacher_config.num_hidden_layers
        )
        self.weights = self._resolve_weights(losses)
        self.num_splits = losses.mha_splits or student_config.num_attention_heads
        self.relation_teacher_layer = losses.relation_teacher_layer or teacher_config.num_hidden_layers
        self._check_shapes(teacher_config, student_config)
        self.projections = self._make_projections()

    # ---- construction -------------------------------------------------------------------------

    def _resolve_weights(self, losses: LossesSpec) -> dict[str, float]:
        known = {t for terms in PRESET_TERMS[losses.preset].values() for t in terms}
        unknown = sorted(set(losses.weights) - known)
        if unknown:
            raise ValueError(
                f"losses.weights names {unknown}, which the '{losses.preset}' preset does not have; "
                f"its terms are {sorted(known)}"
            )
        terms = PRESET_TERMS[losses.preset][self.stage]
        if self.regression and losses.preset == "mlkd" and losses.regression_contrastive == "off":
            terms = tuple(t for t in terms if t != "sc")
        if self.qa:
            if losses.weights.get("sc", 0.0) > 0:
                raise ValueError(
                    "losses.weights: sc (sample-contrastive) needs class labels, which question answering has "
                    "not; remove 'sc' (it is off for SQuAD by default)"
                )
            terms = tuple(t for t in terms if t != "sc")
        weights = {t: float(losses.weights.get(t, 1.0)) for t in terms}
        active = {t: w for t, w in weights.items() if w != 0.0}
        if not active:
            raise ValueError(f"losses.weights switches off every stage-{self.stage} term; nothing would be trained")
        return active

    def _check_shapes(self, t_cfg: PretrainedConfig, s_cfg: PretrainedConfig) -> None:
        preset = self.spec.preset
        if preset == "mlkd" and "mha" in self.weights:
            a = self.num_splits
            if self.d_teacher % a or self.d_student % a:
                raise ValueError(
                    f"losses.mha_splits = {a} must divide the teacher width {self.d_teacher} and the student "
                    f"width {self.d_student}; pick a common divisor"
                )
        if preset == "tinybert" and "attn" in self.weights and t_cfg.num_attention_heads != s_cfg.num_attention_heads:
            raise ValueError(
                f"the tinybert preset's attention loss needs equal head counts (teacher "
                f"{t_cfg.num_attention_heads}, student {s_cfg.num_attention_heads}); use the mlkd preset, "
                "whose MHA relation works with any head count"
            )
        if preset == "minilmv2":
            a = self.spec.relation_heads
            if self.d_teacher % a or self.d_student % a:
                raise ValueError(
                    f"losses.relation_heads = {a} must divide the teacher width {self.d_teacher} and the "
                    f"student width {self.d_student}"
                )
            if not 1 <= self.relation_teacher_layer <= t_cfg.num_hidden_layers:
                raise ValueError(
                    f"losses.relation_teacher_layer = {self.relation_teacher_layer} is outside the teacher's "
                    f"layers 1..{t_cfg.num_hidden_layers}"
                )

    def _make_projections(self) -> nn.ModuleList:
        """W_h ∈ R^{dS×dT}: per mapped layer (index n-1) or one shared; TinyBERT adds one for embeddings."""
        preset, n = self.spec.preset, self.num_student_layers
        if preset == "mlkd":
            count = n
        elif preset == "tinybert":
            count = n + 1
        elif preset == "distilbert" and self.d_student != self.d_teacher:
            count = 1
        else:
            return nn.ModuleList()
        if self.spec.projection == "shared":
            count = 1
        projections = nn.ModuleList(nn.Linear(self.d_student, self.d_teacher) for _ in range(count))
        used = self._used_projections(count)
        for index, projection in enumerate(projections):
            projection.requires_grad_(index in used)
        return projections

    def _used_projections(self, count: int) -> set[int]:
        """Projections this stage trains; the rest are kept (frozen) so stage checkpoints line up."""
        preset = self.spec.preset
        if count == 1:
            uses = {
                "mlkd": {"ffn", "sc"} if self.spec.contrastive_projection else {"ffn"},
                "tinybert": {"emb", "hidden"},
                "distilbert": {"cos"},
            }[preset]
            return {0} if uses & set(self.weights) else set()
        if preset == "mlkd":
            used = set(range(count)) if "ffn" in self.weights else set()
            if "sc" in self.weights and self.spec.contrastive_projection:
                used.add(count - 1)
            return used
        if preset == "tinybert":
            return ({0} if "emb" in self.weights else set()) | (
                set(range(1, count)) if "hidden" in self.weights else set()
            )
        return set()

    def _projection(self, index: int) -> nn.Linear:
        return self.projections[0 if len(self.projections) == 1 else index]

    # ---- what the models must expose ----------------------------------------------------------

    @property
    def masked_lm(self) -> bool:
        return self.spec.preset == "distilbert" and self.stage == 1

    def teacher_request(self) -> TapRequest:
        return self._request(teacher=True)

    def student_request(self) -> TapRequest:
        return self._request(teacher=False)

    def _request(self, teacher: bool) -> TapRequest:
        w = self.weights
        layers = frozenset(self.layer_map) if teacher else frozenset(range(1, self.num_student_layers + 1))
        last = frozenset({self.layer_map[-1] if teacher else self.num_student_layers})
        relation_layer = frozenset({self.relation_teacher_layer if teacher else self.num_student_layers})
        none: frozenset[int] = frozenset()
        return TapRequest(
            embeddings="emb" in w,
            context_layers=layers if "mha" in w else none,
            hidden_layers=(layers if {"ffn", "hidden"} & set(w) else none) | (last if "cos" in w else none),
            qkv_layers=relation_layer if {"qq", "kk", "vv"} & set(w) else none,
            attention_layers=layers if "attn" in w else none,
            cls=bool({"ss", "sc"} & set(w)),
            logits="kd" in w,
        )

    # ---- the losses ---------------------------------------------------------------------------

    def forward(
        self,
        teacher: Features,
        student: Features,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        span_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        mask = attention_mask if self.spec.mask_padding else None
        if self.qa and "kd" in self.weights:
            support = span_mask if span_mask is not None else attention_mask
            if support is not None:
                teacher = dataclasses.replace(teacher, logits=mask_span_logits(teacher.logits, support))
                student = dataclasses.replace(student, logits=mask_span_logits(student.logits, support))
        terms = {name: self._term(name, teacher, student, mask, labels) for name in self.weights}
        total = sum(self.weights[name] * value for name, value in terms.items())
        return total, {name: value.detach() for name, value in terms.items()}

    def _term(self, name: str, t: Features, s: Features, mask, labels) -> torch.Tensor:
        g = self.layer_map
        pairs = list(enumerate(g, start=1))
        spec = self.spec
        if name == "emb" and spec.preset == "mlkd":
            return embedding_relation_loss(t.embeddings, s.embeddings, mask)
        if name == "emb":  # tinybert: MSE(E^S W_e, E^T)
            return hidden_mse_loss(t.embeddings, self._projection(0)(s.embeddings), mask)
        if name == "mha":
            return sum(mha_relation_loss(t.context[m], s.context[n], mask, self.num_splits) for n, m in pairs)
        if name == "ffn":
            return sum(hidden_mse_loss(t.hidden[m], self._projection(n - 1)(s.hidden[n]), mask) for n, m in pairs)
        if name == "hidden":
            return sum(hidden_mse_loss(t.hidden[m], self._projection(n)(s.hidden[n]), mask) for n, m in pairs)
        if name == "attn":
            return sum(attention_mse_loss(t.attentions[m], s.attentions[n], mask) for n, m in pairs)
        if name in ("qq", "kk", "vv"):
            part = "qkv".index(name[0])
            t_x = t.qkv[self.relation_teacher_layer][part]
            s_x = s.qkv[self.num_student_layers][part]
            return mha_relation_loss(t_x, s_x, mask, spec.relation_heads)
        if name == "cos":
            s_last = s.hidden[self.num_student_layers]
            if len(self.projections):
                s_last = self._projection(0)(s_last)
            return hidden_cosine_loss(t.hidden[g[-1]], s_last, mask)
        if name == "ss":
            return sample_similarity_loss(t.cls, s.cls)
        if name == "sc":
            return sample_contrastive_loss(t.cls, self._student_cls_for_contrast(s.cls), self._labels(labels), spec.contrastive_temperature)
        if name == "kd":
            if self.regression:
                return prediction_mse_loss(t.logits, s.logits)
            if spec.preset == "tinybert":
                return soft_cross_entropy_loss(t.logits, s.logits, spec.kd_temperature)
            scale = 1.0 if spec.kd_scale_by_t2 else spec.kd_temperature**-2
            return prediction_kd_loss(t.logits, s.logits, spec.kd_temperature) * scale
        raise KeyError(name)

    def _student_cls_for_contrast(self, s_cls: torch.Tensor) -> torch.Tensor:
        if self.spec.contrastive_projection:
            return self._projection(self.num_student_layers - 1)(s_cls)
        return s_cls

    def _labels(self, labels: torch.Tensor | None) -> torch.Tensor:
        if labels is None:
            raise ValueError("the sample-contrastive term (sc) needs the batch's labels")
        if self.regression:  # regression_contrastive == "bins": scores rounded to the nearest integer
            return torch.round(labels.float()).long()
        return labels
