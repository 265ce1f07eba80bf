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


#: TinyBERT zeroes every attention score at or below this before its MSE: the entries its additive
#: −10000 mask pushed down (ours are at the dtype's minimum), so padded keys compare as 0 = 0.
TINYBERT_MASKED_SCORE = -100.0


@fp32_loss
def attention_score_mse_loss(
    t_scores: torch.Tensor, s_scores: torch.Tensor, masked_at_or_below: float = TINYBERT_MASKED_SCORE
) -> torch.Tensor:
    """TinyBERT's attention loss for one layer pair, on the unnormalised scores (paper §3.1, eq. 3).

    t_scores, s_scores [B, H, L, L]: A = QKᵀ/√d_k + mask, before the softmax (equal head counts).
    As the official code (huawei-noah/Pretrained-Language-Model, TinyBERT/task_distill.py and
    general_distill.py: ``torch.where(att <= -1e2, 0, att)`` on both sides, then ``MSELoss()``)::

        A' = where(A ≤ −100, 0, A);   L_attn = 1/(B·H·L·L) Σ_{b,h,i,j} (A'^S − A'^T)²_{b,h,i,j}

    i.e. a mean over every element, padded rows included; a masked key contributes 0 = 0.
    ``masked_at_or_below`` is that threshold (TextBrewer's ``attention_mse`` uses −1e-3).
    """
    if t_scores.shape != s_scores.shape:
        raise ValueError(
            f"attention maps of shapes {tuple(t_scores.shape)} and {tuple(s_scores.shape)} cannot be compared; "
            "the tinybert preset needs the student's head count to equal the teacher's"
        )
    t = t_scores.detach().float()
    s = s_scores.float()
    t = torch.where(t <= masked_at_or_below, torch.zeros_like(t), t)
    s = torch.where(s <= masked_at_or_below, torch.zeros_like(s), s)
    return F.mse_loss(s, t)
