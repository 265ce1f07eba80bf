"""Prediction-layer losses on logits, in fp32."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mlkd_scale.losses.numerics import fp32_loss


@fp32_loss
def prediction_kd_loss(t_logits: torch.Tensor, s_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """L_KD, soft-label distillation: τ² · (1/B) Σ_b KL(softmax(z^T_b/τ) ‖ softmax(z^S_b/τ)).

    t_logits, s_logits [B, C] (or [B, ..., C]: every leading position is a distribution, e.g. SQuAD's
    start and end). The τ² factor keeps gradient magnitudes comparable across temperatures.
    """
    t_logp = F.log_softmax(t_logits.detach().float() / temperature, dim=-1)
    s_logp = F.log_softmax(s_logits.float() / temperature, dim=-1)
    kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1)
    return kl.mean() * temperature**2


@fp32_loss
def soft_cross_entropy_loss(t_logits: torch.Tensor, s_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """TinyBERT's prediction loss: (1/B) Σ_b −softmax(z^T_b/τ) · log_softmax(z^S_b/τ)."""
    t_prob = F.softmax(t_logits.detach().float() / temperature, dim=-1)
    s_logp = F.log_softmax(s_logits.float() / temperature, dim=-1)
    return -(t_prob * s_logp).sum(-1).mean()


@fp32_loss
def prediction_mse_loss(t_logits: torch.Tensor, s_logits: torch.Tensor) -> torch.Tensor:
    """Regression KD (STS-B): mean of (z^S − z^T)² over the batch's outputs."""
    return F.mse_loss(s_logits.float(), t_logits.detach().float())
