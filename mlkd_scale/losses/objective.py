"""The distillation objective: the spec's loss section turned into a weighted sum of one preset's terms.

The preset (``losses.preset``, one module of :mod:`mlkd_scale.losses.presets` each: ``mlkd``,
``tinybert``, ``minilmv2``, ``distilbert``) names the terms of each stage, what the taps must
record, how many projections it trains and how each term is computed; its module docstring
carries the formulas. The objective owns what is trained besides the student (the projections,
state-dict keys ``projections.N...``), drops the terms the task cannot have, weights the rest
(``losses.weights``, else the preset's defaults) and sums them.

Question answering (``qa=True``, SQuAD): the logits are the stacked start/end logits ``[B, 2, L]``
and the prediction loss distils both distributions over the valid positions only (formula in
:func:`~mlkd_scale.losses.prediction.mask_span_logits`); terms that need class labels (mlkd's L_SC)
are off, and a weight > 0 for one is an error rather than a silent no-op. Regression tasks drop
them too unless the preset keeps them (mlkd with ``losses.regression_contrastive: bins``).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from transformers import PretrainedConfig

from mlkd_scale.losses.prediction import mask_span_logits
from mlkd_scale.losses.presets import Preset, PresetSetup, TermInputs, get_preset
from mlkd_scale.models.mapping import resolve_layer_mapping
from mlkd_scale.models.taps import Features, TapRequest
from mlkd_scale.spec import LossesSpec


class DistillationObjective(nn.Module):
    """Weighted sum of one preset's loss terms for one stage; holds the trainable projections.

    ``forward(teacher_features, student_features, attention_mask, labels, span_mask)`` returns
    ``(total, terms)`` where ``terms`` maps each active term name to its detached, unweighted value.
    ``labels`` are the batch's labels [B] (task stages), or the masked-LM labels [B, L] when
    :attr:`masked_lm` is true. ``span_mask`` (QA only) marks the positions the start/end
    distributions are taken over; without one, QA uses the attention mask.
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
        setup = PresetSetup(losses, stage, regression, qa, self.layer_map, teacher_config, student_config)
        self.preset: Preset = get_preset(losses.preset)(setup)
        self.num_splits = setup.num_splits
        self.weights = self._resolve_weights(losses)
        self.preset.check_shapes(self.weights)
        self.projections = self._make_projections()

    # ---- construction -------------------------------------------------------------------------

    def _resolve_weights(self, losses: LossesSpec) -> dict[str, float]:
        preset = self.preset
        known = preset.all_terms()
        unknown = sorted(set(losses.weights) - known)
        if unknown:
            raise ValueError(
                f"losses.weights names {unknown}, which the '{preset.name}' preset does not have; "
                f"its terms are {sorted(known)}"
            )
        terms = preset.stage_terms()
        needs_labels = preset.label_terms & set(terms)
        if self.qa:
            on = [f"{t} ({preset.titles[t]})" if t in preset.titles else t for t in sorted(needs_labels)
                  if losses.weights.get(t, 0.0) > 0]
            if on:
                raise ValueError(
                    f"losses.weights: {', '.join(on)} needs class labels, which question answering has not; "
                    "remove it (it is off for SQuAD by default)"
                )
        if self.qa or (self.regression and not preset.label_terms_for_regression()):
            terms = tuple(t for t in terms if t not in needs_labels)
        weights = {t: float(losses.weights.get(t, preset.default_weight(t))) for t in terms}
        active = {t: w for t, w in weights.items() if w != 0.0}
        if not active:
            raise ValueError(f"losses.weights switches off every stage-{self.stage} term; nothing would be trained")
        return active

    def _make_projections(self) -> nn.ModuleList:
        """The preset's student→teacher projections; the ones this stage does not use are kept but
        frozen, so the checkpoints of both stages have the same keys."""
        count = self.preset.num_projections()
        projections = nn.ModuleList(nn.Linear(self.d_student, self.d_teacher) for _ in range(count))
        if count and self.spec.projection_init == "identity":
            if self.d_student != self.d_teacher:
                raise ValueError(
                    f"losses.projection_init: 'identity' needs the student's width ({self.d_student}) to equal "
                    f"the teacher's ({self.d_teacher}); use 'random' or a student as wide as the teacher"
                )
            with torch.no_grad():
                for projection in projections:
                    projection.weight.copy_(torch.eye(self.d_student))
                    projection.bias.zero_()
        used = self.preset.used_projections(self.weights, count)
        for index, projection in enumerate(projections):
            projection.requires_grad_(index in used)
        return projections

    def _project(self, index: int, x: torch.Tensor) -> torch.Tensor:
        return self.projections[0 if len(self.projections) == 1 else index](x)

    # ---- what the models must expose ----------------------------------------------------------

    @property
    def masked_lm(self) -> bool:
        """True when an active term reads masked-LM logits [B, L, V] and labels [B, L] (distilbert's
        stage 1): the batches must be MLM-masked and both models need a masked-LM head."""
        return bool(self.preset.masked_lm_terms.get(self.stage, frozenset()) & set(self.weights))

    def teacher_request(self) -> TapRequest:
        return self.preset.request(self.weights, teacher=True)

    def student_request(self) -> TapRequest:
        return self.preset.request(self.weights, teacher=False)

    # ---- the losses ---------------------------------------------------------------------------

    def forward(
        self,
        teacher: Features,
        student: Features,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        span_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.qa and "kd" in self.weights:
            support = span_mask if span_mask is not None else attention_mask
            if support is not None:
                teacher = dataclasses.replace(teacher, logits=mask_span_logits(teacher.logits, support))
                student = dataclasses.replace(student, logits=mask_span_logits(student.logits, support))
        inputs = TermInputs(teacher, student, attention_mask, labels, self._project)
        terms = {name: self.preset.term(name, inputs) for name in self.weights}
        total = sum(self.weights[name] * value for name, value in terms.items())
        return total, {name: value.detach() for name, value in terms.items()}
