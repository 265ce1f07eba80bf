"""Feature-level losses on token states, in fp32, over real tokens only."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mlkd_scale.losses.numerics import fp32_loss


def _token_weights(attention_mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    if attention_mask is None:
        return torch.ones(like.shape[:2], dtype=torch.float32, device=like.device)
    return attention_mask.to(torch.float32)


@fp32_loss
def hidden_mse_loss(
    t_hidden: torch.Tensor, s_hidden_projected: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """L_FFN for one layer pair (also TinyBERT's embedding and hidden-state losses).

    t_hidden [B, L, dT]; s_hidden_projected [B, L, dT] = H^S W_h; attention_mask [B, L].
    MSE over the real tokens' elements: Σ_{b, real i, k} (H^S W_h − H^T)²_{b,i,k} / (#real tokens · dT).
    """
    weights = _token_weights(attention_mask, t_hidden)
    diff = s_hidden_projected.float() - t_hidden.detach().float()
    return (diff.square().sum(-1) * weights).sum() / (weights.sum() * t_hidden.shape[-1])


@fp32_loss
def hidden_cosine_loss(
    t_hidden: torch.Tensor, s_hidden: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """DistilBERT's cosine embedding loss: mean over real tokens of 1 − cos(h^S_i, h^T_i).

    t_hidden, s_hidden [B, L, d] (same width: project the student first if needed).
    """
    weights = _token_weights(attention_mask, t_hidden)
    cosine = F.cosine_similarity(s_hidden.float(), t_hidden.detach().float(), dim=-1)
    return ((1 - cosine) * weights).sum() / weights.sum()


@fp32_loss
def attention_mse_loss(
    t_attn: torch.Tensor, s_attn: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """TinyBERT's attention loss for one layer pair: (1/H) Σ_h MSE(A^S_h, A^T_h).

    t_attn, s_attn [B, H, L, L] attention probabilities (equal head counts); the mean runs over real
    query rows and real keys only.
    """
    if t_attn.shape != s_attn.shape:
        raise ValueError(
            f"attention maps of shapes {tuple(t_attn.shape)} and {tuple(s_attn.shape)} cannot be compared; "
            "the tinybert preset needs the student's head count to equal the teacher's"
        )
    sq = (s_attn.float() - t_attn.detach().float()).square()
    if attention_mask is None:
        return sq.mean()
    real = attention_mask.to(torch.float32)
    pair = real[:, None, :, None] * real[:, None, None, :]
    return (sq * pair).sum() / (pair.sum() * t_attn.shape[1])
