"""The ``losses`` section of a run spec: the preset and every reading the paper leaves open."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from mlkd_scale.spec.fields import StrictModel
from mlkd_scale.spec.presets import check_preset_name


class LossesSpec(StrictModel):
    """Which distillation objective to run, and every reading the paper leaves open.

    Term names per preset and stage (stage 1 = embedding + Transformer layers, stage 2 = prediction);
    each preset is one module of ``mlkd_scale/losses/presets/`` whose docstrings carry the formulas:

    ========== ========================================= ===================================
    preset     stage 1                                   stage 2
    ========== ========================================= ===================================
    mlkd       emb, mha, ffn                             ss, sc, kd
    tinybert   emb, attn (unnormalised scores), hidden   kd (soft cross-entropy)
    minilmv2   qq, kk, vv                                kd, or ce with stage2_target=labels
    distilbert kd (MLM logits, T=2), mlm, cos            kd, cos
    ========== ========================================= ===================================

    Defaults that depend on the preset are ``None`` here and resolved by the preset: ``projection``
    (tinybert: one shared ``fit_dense`` as in TinyBERT's code; mlkd: one W_h per layer),
    ``kd_temperature`` (distilbert 2.0, the others 1.0) and the weights of terms not named in
    ``weights`` (distilbert stage 1: kd 5.0, mlm 2.0, cos 1.0, its training command's alphas; every
    other term 1.0).
    """

    preset: str = Field(
        "mlkd",
        description="The loss preset: mlkd, tinybert, minilmv2, distilbert (or one registered by a plug-in).",
    )
    weights: dict[str, float] = Field(
        default_factory=dict,
        description="Per-term weight by term name (see the table above); terms not named get the preset's "
        "default (1.0 except distilbert stage 1: kd 5.0, mlm 2.0, cos 1.0); a weight of 0 switches a term off.",
    )
    layer_mapping: Literal["uniform"] | list[int] = Field(
        "uniform",
        description="'uniform': student layer n (1..N) learns from teacher layer floor(n*M/N); or an explicit "
        "list of N teacher layers (1-based). Embeddings always map to embeddings.",
    )
    mha_splits: int | None = Field(
        None,
        ge=1,
        description="A_s, the number of MHA-splits of the concatenated head context (paper §2.2). "
        "None: the student's head count (the paper's primary reading). Must divide both widths.",
    )
    mask_padding: bool = Field(
        True,
        description="mlkd and minilmv2: mask padded keys out of token relations and padded rows out of the "
        "averages. tinybert and distilbert always follow their authors' code (TinyBERT averages over every "
        "position; DistilBERT over real tokens).",
    )
    projection: Literal["per_layer", "shared"] | None = Field(
        None,
        description="Student->teacher projections W_h: one per mapped layer, or one shared. None = the "
        "preset's default: tinybert 'shared' (TinyBERT's single fit_dense, used for embeddings and every "
        "layer), mlkd 'per_layer' (the prototype's reading).",
    )
    ffn_reduction: Literal["sum", "mean"] = Field(
        "sum",
        description="mlkd: L_FFN over the N mapped layers. 'sum' = Σ_n MSE(H^S_n W_h, H^T_m), as the method "
        "notes give it (like L_MHA, no 1/N); 'mean' divides by N. The secondary sources disagree on the 1/N.",
    )
    kd_temperature: float | None = Field(
        None, gt=0, description="tau of the soft-label KD loss; None = the preset's (distilbert 2.0, others 1.0)."
    )
    kd_scale_by_t2: bool = Field(
        True, description="Multiply the soft-label KD loss by tau^2 (mlkd, minilmv2, distilbert; TinyBERT never does)."
    )
    stage2_target: Literal["kd", "labels"] = Field(
        "kd",
        description="minilmv2: Stage 2 distils the teacher's logits ('kd') or fine-tunes on the labels "
        "('labels', MiniLMv2's paper: the term 'ce', cross-entropy; MSE on the score for regression).",
    )
    contrastive_temperature: float = Field(0.2, gt=0, description="tau of the sample-contrastive loss L_SC.")
    projection_init: Literal["random", "identity"] = Field(
        "random",
        description="Initial W_h of every student->teacher projection: 'random' (nn.Linear's default) or "
        "'identity' (W_h = I, b = 0; needs the student's width to equal the teacher's). The paper does not say. "
        "With a student initialised from teacher layers, 'identity' makes L_FFN keep the student's hidden "
        "states in the teacher's space instead of letting a random W_h absorb the difference.",
    )
    contrastive_projection: bool = Field(
        True,
        description="Project the student [CLS] to teacher width with the last layer's W_h before L_SC "
        "(prototype's reading); False requires equal widths.",
    )
    regression_contrastive: Literal["off", "bins"] = Field(
        "off",
        description="L_SC for regression tasks (STS-B): 'off' drops it, 'bins' uses rounded scores as labels.",
    )
    batch_relations: Literal["global", "local"] = Field(
        "global",
        description="Which samples L_SS and L_SC relate: 'global' gathers the micro batch of every "
        "data-parallel rank (micro_batch_size x world size samples, gradients flowing back to each rank's "
        "own samples), so the objective does not depend on the number of ranks; 'local' relates each rank's "
        "micro batch alone, which makes the objective change with the world size. Either way each micro "
        "step of gradient accumulation is its own relation (the accumulated steps' losses are averaged, "
        "not one relation over the accumulated batch).",
    )
    relation_heads: int = Field(48, ge=1, description="minilmv2 preset: relation heads A_r.")
    relation_teacher_layer: int | None = Field(
        None, ge=1, description="minilmv2 preset: teacher layer (1-based) to distil from; None = last."
    )

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, name: str) -> str:
        return check_preset_name(name)

    @field_validator("weights")
    @classmethod
    def _weights_not_negative(cls, weights: dict[str, float]) -> dict[str, float]:
        negative = {name: w for name, w in weights.items() if w < 0}
        if negative:
            raise ValueError(f"loss weights must be >= 0 (0 switches a term off), got {negative}")
        return weights

    @model_validator(mode="after")
    def _stage2_target_is_minilm(self) -> LossesSpec:
        if self.stage2_target == "labels" and self.preset != "minilmv2":
            raise ValueError(
                f"stage2_target: 'labels' is a minilmv2 setting, the {self.preset} preset does not read it; "
                "remove it or set preset to minilmv2"
            )
        return self
