"""MLKD-BERT loss functions (one small function each), the presets, and the objective that weights and sums them."""

from mlkd_scale.losses.contrastive import sample_contrastive_loss
from mlkd_scale.losses.feature import attention_score_mse_loss, hidden_cosine_loss, hidden_mse_loss
from mlkd_scale.losses.objective import DistillationObjective
from mlkd_scale.losses.prediction import (
    label_loss,
    masked_lm_loss,
    prediction_kd_loss,
    prediction_mse_loss,
    soft_cross_entropy_loss,
)
from mlkd_scale.losses.presets import PRESETS, Preset, register_preset
from mlkd_scale.losses.relation import embedding_relation_loss, mha_relation_loss, sample_similarity_loss

__all__ = [
    "PRESETS",
    "DistillationObjective",
    "Preset",
    "attention_score_mse_loss",
    "embedding_relation_loss",
    "hidden_cosine_loss",
    "hidden_mse_loss",
    "label_loss",
    "masked_lm_loss",
    "mha_relation_loss",
    "prediction_kd_loss",
    "prediction_mse_loss",
    "register_preset",
    "sample_contrastive_loss",
    "sample_similarity_loss",
    "soft_cross_entropy_loss",
]
