"""Relation-level losses: KL between the teacher's and the student's similarity distributions.

A *relation* of X ∈ R^{L×d} is the row-wise softmax(X Xᵀ / √d), d being the width of the (split)
vectors; each model is scaled by its own width, so teacher and student relations are both L×L
whatever their widths. Padded keys are masked out of each row, and the KL(teacher row ‖ student
row) is averaged over the real query rows of the whole batch (and over splits). Everything is
computed in fp32 whatever the input dtype (KL in bf16 is badly wrong).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from mlkd_scale.losses.numerics import fp32_loss

# Added to masked logits instead of -inf: exp() still gives exactly 0 in fp32, and the KL term
# p·(log p − log q) stays 0·finite = 0 instead of 0·(−inf + inf) = NaN.
_MASKED = -1e9


def split_relation_logits(
    x: torch.Tensor, num_splits: int, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """[B, L, d] → [B, A, L, L]: scaled dot products within each of A contiguous feature groups.

    attention_mask [B, L] (1 = real token): padded keys get ``_MASKED`` added to their column.
    """
    batch, length, width = x.shape
    if width % num_splits:
        raise ValueError(f"a width of {width} cannot be cut into {num_splits} equal splits")
    split_width = width // num_splits
    xs = x.float().reshape(batch, length, num_splits, split_width).transpose(1, 2)
    # Scale the [.., L, d/A] operand rather than the [.., L, L] product: fewer elements to touch.
    logits = torch.matmul(xs * split_width**-0.5, xs.transpose(-1, -2))
    if attention_mask is not None:
        # In place on the fresh product: no second [B, A, L, L] tensor, and the backward of adding a
        # constant passes the gradient through untouched (a masked_fill would mask it again).
        padded_keys = attention_mask[:, None, None, :] == 0
        logits.add_(padded_keys.to(logits.dtype) * _MASKED)
    return logits


class _WeightedRowKL(torch.autograd.Function):
    """Σ_rows w_row · KL(softmax(t_row) ‖ softmax(s_row)) with a hand-written backward.

    Forward: KL_row = Σ_j p_j (log p_j − log q_j), p = softmax(t_row), q = softmax(s_row).
    Backward: ∂loss/∂s_row = g · w_row · (q − p); the teacher side gets no gradient.
    Saving p and log q and writing the backward as one expression takes about a fifth less time than
    autograd's graph of the same formula (fewer passes over each [B, A, L, L] tensor), and summing
    p·(log p − log q) term by term avoids the cancellation of Σ p log p + logsumexp(s) − Σ p·s.
    """

    @staticmethod
    def forward(ctx, t_logits: torch.Tensor, s_logits: torch.Tensor, row_weights: torch.Tensor):
        t_logp = F.log_softmax(t_logits, dim=-1)
        t_prob = t_logp.exp()
        s_logq = F.log_softmax(s_logits, dim=-1)
        row_kl = (t_prob * t_logp.sub_(s_logq)).sum(-1)
        ctx.save_for_backward(t_prob, s_logq, row_weights)
        return (row_kl * row_weights).sum()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        t_prob, s_logq, row_weights = ctx.saved_tensors
        return None, s_logq.exp().sub_(t_prob).mul_((grad * row_weights).unsqueeze(-1)), None


@fp32_loss
def relation_kl(
    t_logits: torch.Tensor, s_logits: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over real query rows (and splits) of KL(softmax(t_row) ‖ softmax(s_row)).

    t_logits, s_logits: [B, A, L, L] relation logits whose padded keys are already masked
    (:func:`split_relation_logits` with the mask); attention_mask: [B, L], 1 = real token, selects
    the query rows averaged over. The teacher side carries no gradient.
    loss = (1 / (A · #real rows)) Σ_{b, a, real i} Σ_j p_j (log p_j − log q_j),
    p = softmax(t_{b,a,i}), q = softmax(s_{b,a,i}).
    """
    batch, splits, length, _ = s_logits.shape
    if attention_mask is None:
        row_weights = torch.full((1, 1, 1), 1.0 / (batch * splits * length), device=s_logits.device)
    else:
        rows = attention_mask.to(torch.float32)[:, None, :]
        row_weights = rows / (rows.sum() * splits)
    return _WeightedRowKL.apply(t_logits.detach(), s_logits, row_weights)


@fp32_loss
def embedding_relation_loss(
    t_emb: torch.Tensor, s_emb: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """L_EMB, the token-similarity relation of the embedding-layer outputs.

    t_emb [B, L, dT], s_emb [B, L, dS], attention_mask [B, L].
    R^T = softmax(E^T E^Tᵀ/√dT), R^S = softmax(E^S E^Sᵀ/√dS) per sequence, padded keys masked;
    L_EMB = (1/#real rows) Σ_{b, real i} KL(R^T_{b,i} ‖ R^S_{b,i}).
    """
    return relation_kl(
        split_relation_logits(t_emb, 1, attention_mask),
        split_relation_logits(s_emb, 1, attention_mask),
        attention_mask,
    )


@fp32_loss
def mha_relation_loss(
    t_ctx: torch.Tensor, s_ctx: torch.Tensor, attention_mask: torch.Tensor | None, num_splits: int
) -> torch.Tensor:
    """L_MHA for one layer pair: self-attention relation over MHA-splits of the head context.

    t_ctx [B, L, dT], s_ctx [B, L, dS]: concatenated per-head context (before W^O); the feature axis
    of each is cut into A = num_splits equal groups (widths dT/A and dS/A), so a 12-head teacher and
    a 3-head student align split to split. attention_mask [B, L].
    R_a = softmax(O_a O_aᵀ / √(d/A)) per sequence and split, padded keys masked;
    loss = (1/(A·#real rows)) Σ_a Σ_{b, real i} KL(R^T_{a,b,i} ‖ R^S_{a,b,i}).
    The objective sums this over mapped layer pairs (no 1/N, as in the paper).
    """
    return relation_kl(
        split_relation_logits(t_ctx, num_splits, attention_mask),
        split_relation_logits(s_ctx, num_splits, attention_mask),
        attention_mask,
    )


@fp32_loss
def sample_similarity_loss(t_cls: torch.Tensor, s_cls: torch.Tensor) -> torch.Tensor:
    """L_SS, the sample-similarity relation of the batch's [CLS] vectors.

    t_cls [B, dT], s_cls [B, dS]. R^T = softmax(C^T C^Tᵀ/√dT), R^S = softmax(C^S C^Sᵀ/√dS) over the
    batch (B×B, diagonal kept); L_SS = (1/B) Σ_i KL(R^T_i ‖ R^S_i). No projection is needed.

    The batch is the objective's: with ``losses.batch_relations: global`` (the default) the micro
    batches of every data-parallel rank of one micro step (B = micro_batch_size × world size,
    :mod:`~mlkd_scale.losses.batch_gather`), with ``local`` this rank's alone, so the loss changes
    with the world size. Gradient accumulation does not widen B: each micro step is its own relation
    and the steps' losses are averaged.
    """
    return relation_kl(split_relation_logits(t_cls[None], 1), split_relation_logits(s_cls[None], 1))
