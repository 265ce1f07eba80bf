"""The ``mlkd`` preset: MLKD-BERT's own objective (shared/paper/mlkd-bert-method.md §2-§3).

* Stage 1: L_EMB + L_MHA + L_FFN (token-similarity relation of the embeddings, self-attention
  relation over A_s MHA-splits of the head context, projected hidden-state MSE).
* Stage 2: L_SS + L_SC + L_KD (sample-similarity relation of [CLS], supervised sample-contrastive
  relation, soft-label KD; L_KD is an MSE for regression, L_SC is off or on binned scores there).

Projections: W_h per mapped layer (``losses.projection`` 'per_layer', the default) or one shared;
index n-1 projects student layer n; the last one also projects the student [CLS] for L_SC
(``losses.contrastive_projection``).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from mlkd_scale.losses.batch_gather import gather_batch
from mlkd_scale.losses.contrastive import sample_contrastive_loss
from mlkd_scale.losses.feature import hidden_mse_loss
from mlkd_scale.losses.presets.base import _NONE, Preset, TermInputs, register_preset
from mlkd_scale.losses.relation import embedding_relation_loss, mha_relation_loss, sample_similarity_loss
from mlkd_scale.models.taps import TapRequest


@register_preset
class MlkdPreset(Preset):
    name = "mlkd"
    terms: ClassVar[dict[int, tuple[str, ...]]] = {1: ("emb", "mha", "ffn"), 2: ("ss", "sc", "kd")}
    label_terms = frozenset({"sc"})
    titles: ClassVar[dict[str, str]] = {"sc": "sample-contrastive"}
    reads = (
        "weights", "layer_mapping", "mha_splits", "mask_padding", "projection", "ffn_reduction",
        "kd_temperature", "kd_scale_by_t2", "contrastive_temperature", "contrastive_projection",
        "regression_contrastive",
    )

    def label_terms_for_regression(self) -> bool:
        return self.spec.regression_contrastive == "bins"

    def check_shapes(self, weights: dict[str, float]) -> None:
        a, s = self.setup.num_splits, self.setup
        if "mha" in weights and (s.d_teacher % a or s.d_student % a):
            raise ValueError(
                f"losses.mha_splits = {a} must divide the teacher width {s.d_teacher} and the student "
                f"width {s.d_student}; pick a common divisor"
            )

    def num_projections(self) -> int:
        return 1 if self.projection == "shared" else self.setup.num_student_layers

    def used_projections(self, weights: dict[str, float], count: int) -> set[int]:
        used = set(range(count)) if "ffn" in weights else set()
        if "sc" in weights and self.spec.contrastive_projection:
            used.add(count - 1)
        return used

    def request(self, weights: dict[str, float], teacher: bool) -> TapRequest:
        layers = self.mapped_layers(teacher)
        return TapRequest(
            embeddings="emb" in weights,
            context_layers=layers if "mha" in weights else _NONE,
            hidden_layers=layers if "ffn" in weights else _NONE,
            cls=bool({"ss", "sc"} & set(weights)),
            logits="kd" in weights,
        )

    def _mask(self, x: TermInputs) -> torch.Tensor | None:
        return x.attention_mask if self.spec.mask_padding else None

    def term_emb(self, x: TermInputs) -> torch.Tensor:
        return embedding_relation_loss(x.teacher.embeddings, x.student.embeddings, self._mask(x))

    def term_mha(self, x: TermInputs) -> torch.Tensor:
        a, mask = self.setup.num_splits, self._mask(x)
        return sum(mha_relation_loss(x.teacher.context[m], x.student.context[n], mask, a) for n, m in self.setup.pairs)

    def term_ffn(self, x: TermInputs) -> torch.Tensor:
        """L_FFN = Σ_n MSE(H^S_n W_h, H^T_g(n)) ('sum'), or that over N ('mean'; ``losses.ffn_reduction``)."""
        mask = self._mask(x)
        pairs = self.setup.pairs
        total = sum(hidden_mse_loss(x.teacher.hidden[m], x.project(n - 1, x.student.hidden[n]), mask) for n, m in pairs)
        return total / len(pairs) if self.spec.ffn_reduction == "mean" else total

    def term_ss(self, x: TermInputs) -> torch.Tensor:
        t_cls, s_cls, _ = self.batch_relation_inputs(x.teacher.cls, x.student.cls)
        return sample_similarity_loss(t_cls, s_cls)

    def term_sc(self, x: TermInputs) -> torch.Tensor:
        labels = self.need_labels(x.labels, "sample-contrastive (sc)")
        if self.setup.regression:  # regression_contrastive == "bins": scores rounded to the nearest integer
            labels = torch.round(labels.float()).long()
        s_cls = x.student.cls
        if self.spec.contrastive_projection:
            s_cls = x.project(self.setup.num_student_layers - 1, s_cls)
        t_cls, s_cls, labels = self.batch_relation_inputs(x.teacher.cls, s_cls, labels)
        return sample_contrastive_loss(t_cls, s_cls, labels, self.spec.contrastive_temperature)

    def batch_relation_inputs(
        self, t_cls: torch.Tensor, s_cls: torch.Tensor, labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | None, ...]:
        """The samples L_SS / L_SC relate: this rank's micro batch (``losses.batch_relations: local``)
        or every data-parallel rank's micro batch of this step, gathered differentiably (``global``,
        :func:`~mlkd_scale.losses.batch_gather.gather_batch`)."""
        if self.spec.batch_relations == "local":
            return t_cls, s_cls, labels
        return gather_batch(t_cls, s_cls, labels)

    def term_kd(self, x: TermInputs) -> torch.Tensor:
        return self.soft_label_kd(x.teacher.logits, x.student.logits)
