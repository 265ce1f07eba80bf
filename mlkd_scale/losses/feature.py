"""Feature-level losses on token states, in fp32, over real tokens only."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from mlkd_scale.losses.numerics import fp32_loss


def _token_weights(attention_mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    if attention_mask is None:
        return torch.ones(like.shape[:2], dtype=torch.float32, device=like.device)
    return attention_mask.to(torch.float32)


class _TokenWeightedSquares(torch.autograd.Function):
    """Σ_tokens w_token · ‖s_token − t_token‖² with a hand-written backward.

    Forward: one difference and one per-token norm, a reduction (``linalg.vecdot`` would write the
    squares out first: ``(x * y).sum``); backward:
    2·g·w_token·(s − t) in place on the saved difference. Autograd's graph of the same formula
    makes four passes over [B, L, d] forward and four backward. The teacher gets no gradient.
    """

    @staticmethod
    def forward(ctx, s: torch.Tensor, t: torch.Tensor, weights: torch.Tensor):
        diff = s - t
        ctx.save_for_backward(diff, weights)
        return (torch.linalg.vector_norm(diff, dim=-1).square_() * weights).sum()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        diff, weights = ctx.saved_tensors
        return diff.mul_((2 * grad * weights).unsqueeze(-1)), None, None


@fp32_loss
def hidden_mse_loss(
    t_hidden: torch.Tensor, s_hidden_projected: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """L_FFN for one layer pair (also TinyBERT's embedding and hidden-state losses).

    t_hidden [B, L, dT]; s_hidden_projected [B, L, dT] = H^S W_h; attention_mask [B, L].
    MSE over the real tokens' elements: Σ_{b, real i, k} (H^S W_h − H^T)²_{b,i,k} / (#real tokens · dT).
    """
    weights = _token_weights(attention_mask, t_hidden)
    weights = weights / (weights.sum() * t_hidden.shape[-1])
    return _TokenWeightedSquares.apply(s_hidden_projected.float(), t_hidden.detach().float(), weights)


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
