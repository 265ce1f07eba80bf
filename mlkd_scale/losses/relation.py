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


def _split_rows(x: torch.Tensor, num_splits: int) -> torch.Tensor:
    """[B, L, d] → [B·A, L, d/A] in fp32, contiguous: the vectors of each of A contiguous feature groups."""
    batch, length, width = x.shape
    if width % num_splits:
        raise ValueError(f"a width of {width} cannot be cut into {num_splits} equal splits")
    split_width = width // num_splits
    xs = x.float().reshape(batch, length, num_splits, split_width).transpose(1, 2)
    return xs.reshape(batch * num_splits, length, split_width)


def _key_bias(attention_mask: torch.Tensor | None, num_splits: int) -> torch.Tensor | None:
    """[B, L] mask → [B·A, 1, L]: ``_MASKED`` on padded keys, 0 elsewhere (None without a mask)."""
    if attention_mask is None:
        return None
    bias = (attention_mask == 0).to(torch.float32) * _MASKED
    return bias[:, None, None, :].expand(-1, num_splits, 1, -1).reshape(-1, 1, bias.shape[-1])


def _relation_logits(rows: torch.Tensor, key_bias: torch.Tensor | None) -> torch.Tensor:
    """[N, L, w] → [N, L, L] = rows rowsᵀ / √w (+ the key bias): one fused batched product."""
    scale = rows.shape[-1] ** -0.5
    if key_bias is None:
        return torch.bmm(rows, rows.mT).mul_(scale)
    return torch.baddbmm(key_bias, rows, rows.mT, alpha=scale)


def split_relation_logits(
    x: torch.Tensor, num_splits: int, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """[B, L, d] → [B, A, L, L]: scaled dot products within each of A contiguous feature groups.

    attention_mask [B, L] (1 = real token): padded keys get ``_MASKED`` added to their column.
    The losses below compute the same logits inside :class:`_RelationKL`; this is the plain form.
    """
    batch, length, _ = x.shape
    logits = _relation_logits(_split_rows(x, num_splits), _key_bias(attention_mask, num_splits))
    return logits.reshape(batch, num_splits, length, length)


class _RelationKL(torch.autograd.Function):
    """Σ_rows w_row · KL(softmax(T_row) ‖ softmax(S_row)), T and S the relation logits of two row sets.

    Inputs: the teacher's and the student's split vectors [N, L, w_T] and [N, L, w_S] (N = B·A),
    the padded keys' bias [N, 1, L] or None, and the row weights (broadcastable to [N, L]).
    Forward: T = t tᵀ/√w_T + bias, S = s sᵀ/√w_S + bias (one ``baddbmm`` each, no scaled copy of
    the operands), KL_row = Σ_j p_j (log p_j − log q_j) term by term (no cancellation).
    Backward, written by hand: ∂loss/∂S = g·w_row·(q − p) (as Σ_j p_j = 1), and since S is symmetric in s,
    ∂loss/∂s = (G + Gᵀ) s /√w_S with G that gradient: two products straight from the saved
    [N, L, L] buffer (autograd's graph of the same formula keeps a scaled copy of s, re-lays out
    both operands of the 4-D matmul and reduces over expanded dims). The teacher gets no gradient.
    """

    @staticmethod
    def forward(ctx, t_rows, s_rows, key_bias, row_weights):
        t_logp = F.log_softmax(_relation_logits(t_rows, key_bias), dim=-1)
        t_prob = t_logp.exp()
        s_logq = F.log_softmax(_relation_logits(s_rows, key_bias), dim=-1)
        row_kl = t_logp.sub_(s_logq).mul_(t_prob).sum(-1)  # in place: no third [N, L, L] buffer
        ctx.save_for_backward(t_prob, s_logq, s_rows, row_weights)
        return (row_kl * row_weights).sum()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        t_prob, s_logq, s_rows, row_weights = ctx.saved_tensors
        factor = (grad * s_rows.shape[-1] ** -0.5 * row_weights).unsqueeze(-1)
        # dS = c·(q − p) with c = g·w_row/√w_S, as log_softmax's own fused backward of the upstream
        # gradient −c·p: one pass that recomputes q = exp(log q) row by row in cache.
        d_logits = torch._log_softmax_backward_data(t_prob.mul_(-factor), s_logq, -1, torch.float32)
        d_rows = torch.bmm(d_logits, s_rows)
        return None, d_rows.baddbmm_(d_logits.mT, s_rows), None, None


def _relation_loss(
    t_x: torch.Tensor, s_x: torch.Tensor, num_splits: int, attention_mask: torch.Tensor | None
) -> torch.Tensor:
    """Mean over real query rows (and splits) of KL(teacher relation row ‖ student relation row).

    t_x [B, L, dT], s_x [B, L, dS] (the relation of each split is over the L axis); attention_mask
    [B, L], 1 = real token: padded keys are masked out of every row and padded query rows get
    weight 0. loss = (1 / (A · #real rows)) Σ_{b, a, real i} KL(R^T_{b,a,i} ‖ R^S_{b,a,i}).
    """
    batch, length, _ = s_x.shape
    t_rows, s_rows = _split_rows(t_x.detach(), num_splits), _split_rows(s_x, num_splits)
    if attention_mask is None:
        row_weights = torch.full((1, 1), 1.0 / (batch * num_splits * length), device=s_x.device)
    else:
        rows = attention_mask.to(torch.float32)
        rows = rows / (rows.sum() * num_splits)
        row_weights = rows[:, None, :].expand(-1, num_splits, -1).reshape(batch * num_splits, length)
    return _RelationKL.apply(t_rows, s_rows, _key_bias(attention_mask, num_splits), row_weights)


@fp32_loss
def embedding_relation_loss(
    t_emb: torch.Tensor, s_emb: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """L_EMB, the token-similarity relation of the embedding-layer outputs.

    t_emb [B, L, dT], s_emb [B, L, dS], attention_mask [B, L].
    R^T = softmax(E^T E^Tᵀ/√dT), R^S = softmax(E^S E^Sᵀ/√dS) per sequence, padded keys masked;
    L_EMB = (1/#real rows) Σ_{b, real i} KL(R^T_{b,i} ‖ R^S_{b,i}).
    """
    return _relation_loss(t_emb, s_emb, 1, attention_mask)


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
    return _relation_loss(t_ctx, s_ctx, num_splits, attention_mask)


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
    return _relation_loss(t_cls[None], s_cls[None], 1, None)
