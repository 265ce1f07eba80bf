"""Relation-level losses: KL between the teacher's and the student's similarity distributions.

A *relation* of X ∈ R^{L×d} is the row-wise softmax(X Xᵀ / √d), d being the width of the (split)
vectors; each model is scaled by its own width, so teacher and student relations are both L×L
whatever their widths. Padded keys are masked out of each row, and the KL(teacher row ‖ student
row) is averaged over the real query rows of the whole batch (and over splits). Everything is
computed in fp32 whatever the input dtype (KL in bf16 is badly wrong).
"""

from __future__ import annotations

import torch
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
    """[N, L, w] → [N, L, L] = rows rowsᵀ / √w (+ the key bias): one batched product, scale and bias
    applied by it (without a bias, ``beta=0`` ignores the zero it is given)."""
    scale = rows.shape[-1] ** -0.5
    if key_bias is None:
        return torch.baddbmm(rows.new_zeros(()), rows, rows.mT, beta=0, alpha=scale)
    return torch.baddbmm(key_bias, rows, rows.mT, alpha=scale)


#: How many bytes of one [rows, L, L] fp32 buffer the relation KL handles at once. On a CPU the
#: logits and probabilities of a chunk then stay in a core's L2 cache through every
#: elementwise pass, where the whole [B·A, L, L] tensors (6 MiB each at batch 8, length 128, 12 splits)
#: would go out to memory on each (figures in docs/performance.md; under ``train.compile: objective``
#: inductor fuses each chunk's passes). A GPU takes up to 64 MiB per buffer, a few large kernels; the
#: chunks bound the transient memory there.
CHUNK_BYTES = {"cpu": 512 * 2**10, "gpu": 64 * 2**20}


def _rows_per_chunk(length: int, device: torch.device) -> int:
    budget = CHUNK_BYTES["cpu" if device.type == "cpu" else "gpu"]
    return max(1, budget // (4 * length * length))


def _log_sum_exp_gap(
    t_logits: torch.Tensor, p: torch.Tensor, s_logits: torch.Tensor, q: torch.Tensor
) -> torch.Tensor:
    """Each row's lse(T) − lse(S) (lse = log Σ_j exp), given the logits and their softmaxes p and q.

    As p_j = exp(T_j − lse(T)), a row's largest logit has its largest probability (≥ 1/L, no underflow),
    so lse(T) = max T − log max p without another pass of exp over the row. The maxima are subtracted
    before the logs: near convergence T ≈ S and the gap is tiny beside lse itself (≈ max T).
    """
    return (t_logits.amax(-1) - s_logits.amax(-1)).sub_(p.amax(-1).div_(q.amax(-1)).log_())


class _RelationKL(torch.autograd.Function):
    """Σ_rows w_row · KL(softmax(T_row) ‖ softmax(S_row)), T and S the relation logits of two row sets.

    Inputs: the teacher's and the student's split vectors [N, L, w_T] and [N, L, w_S] (N = B·A),
    the padded keys' bias [N, 1, L] or None, and the row weights (broadcastable to [N, L]).
    Per chunk of the N relations (:data:`CHUNK_BYTES`): T = t tᵀ/√w_T + bias, S = s sᵀ/√w_S + bias
    (one ``baddbmm`` each, no scaled copy of the operands), p = softmax(T), q = softmax(S), and
    KL_row = Σ_j p_j (log p_j − log q_j) term by term (no cancellation between large sums), with
    log p_j − log q_j = (T_j − S_j) − (lse_T − lse_S) and each row's log-sum-exp read off its softmax
    (:func:`_log_sum_exp_gap`): two softmax passes are the only exponentials per element (a standalone
    ``exp`` costs as much as a whole fused softmax on a CPU). The gradient is computed in the same
    pass, while the chunk's p and q are in cache: ∂loss/∂S = w_row·(q − p) (as Σ_j p_j = 1), and
    since S is symmetric in s, ∂loss/∂s = (G + Gᵀ) s /√w_S with G that gradient. Only ∂loss/∂s
    ([N, L, w_S], the student input's size) is kept for the backward, which scales it by the incoming
    gradient; no [N, L, L] buffer outlives the forward. Without a gradient to compute (evaluation)
    that part is skipped. The teacher gets no gradient.
    """

    @staticmethod
    def forward(ctx, t_rows, s_rows, key_bias, row_weights):
        count, length, width = s_rows.shape
        row_weights = row_weights.expand(count, length)
        grad_rows = torch.empty_like(s_rows) if ctx.needs_input_grad[1] else None
        row_kl = s_rows.new_empty(count, length)
        step = _rows_per_chunk(length, s_rows.device)
        for start in range(0, count, step):
            part = slice(start, start + step)
            bias = None if key_bias is None else key_bias[part]
            t_logits = _relation_logits(t_rows[part], bias)
            p = torch.softmax(t_logits, dim=-1)
            s_logits = _relation_logits(s_rows[part], bias)
            q = torch.softmax(s_logits, dim=-1)
            lse_gap = _log_sum_exp_gap(t_logits, p, s_logits, q)
            log_ratio = t_logits.sub_(s_logits).sub_(lse_gap[..., None])  # log p − log q, in place
            row_kl[part] = log_ratio.mul_(p).sum(-1)  # in place: vecdot would write the products anew
            if grad_rows is not None:
                d_logits = q.sub_(p).mul_(row_weights[part, :, None])  # w_row·(q − p)
                rows, grad_part = s_rows[part], grad_rows[part]
                torch.bmm(d_logits, rows, out=grad_part).baddbmm_(d_logits.mT, rows).mul_(width**-0.5)
        ctx.save_for_backward(grad_rows)
        return (row_kl * row_weights).sum()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (grad_rows,) = ctx.saved_tensors
        return None, grad_rows * grad, None, None


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
