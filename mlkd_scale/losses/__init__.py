"""MLKD-BERT loss functions (one small function each) and the objective that weights and sums them."""

from mlkd_scale.losses.contrastive import sample_contrastive_loss
from mlkd_scale.losses.feature import attention_mse_loss, hidden_cosine_loss, hidden_mse_loss
from mlkd_scale.losses.objective import PRESET_TERMS, DistillationObjective
from mlkd_scale.losses.prediction import prediction_kd_loss, prediction_mse_loss, soft_cross_entropy_loss
from mlkd_scale.losses.relation import embedding_relation_loss, mha_relation_loss, sample_similarity_loss

__all__ = [
    "PRESET_TERMS",
    "DistillationObjective",
    "attention_mse_loss",
    "embedding_relation_loss",
    "hidden_cosine_loss",
    "hidden_mse_loss",
    "mha_relation_loss",
    "prediction_kd_loss",
    "prediction_mse_loss",
    "sample_contrastive_loss",
    "sample_similarity_loss",
    "soft_cross_entropy_loss",
]
