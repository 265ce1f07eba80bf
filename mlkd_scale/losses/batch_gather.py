"""Differentiable gather of every data-parallel rank's micro batch, for the batch relations L_SS, L_SC.

L_SS and L_SC relate the samples of a batch to each other, so computed on each rank's micro batch
alone they would change with the number of ranks. :func:`gather_batch` gives every rank the rows of
all ranks (in rank order); every rank then computes the same global loss L.

Gradient. Each rank's backward gives every gathered row i the gradient ∂L/∂x_i; the gather's
backward sums these over the ranks and keeps the rank's own rows, so rank r gets
g_r = W · ∂L/∂x_{i∈r} (W ranks, each contributing the same ∂L/∂x_i). DeepSpeed then averages the
parameter gradients over the ranks: (1/W) Σ_r W Σ_{i∈r} ∂L/∂x_i · ∂x_i/∂θ = Σ_i ∂L/∂x_i · ∂x_i/∂θ,
which is the gradient one rank gets for the whole global batch. Micro batches may differ in size
per rank (each is padded to the largest for the collective, and the padding dropped).

``torch.distributed.nn.functional.all_gather`` has the same backward but needs equal sizes, warns on
every call that it is deprecated and refuses to run under ``torch.compile``; the few lines below use
only ``all_gather`` and ``all_reduce``, which every backend (gloo included) has.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class _GatherRows(torch.autograd.Function):
    """[B_r, ...] on rank r → [Σ_r B_r, ...] on every rank; backward: the rank-sum of the gradient of
    the rank's own rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
        rank = dist.get_rank(group)
        ctx.group = group
        ctx.rows = (sum(sizes[:rank]), sum(sizes[: rank + 1]))
        padded = x.new_zeros((max(sizes), *x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded, group=group)
        return torch.cat([part[:size] for part, size in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        summed = grad.contiguous().clone()  # all_reduce works in place; the incoming gradient is not ours
        dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=ctx.group)
        start, end = ctx.rows
        return summed[start:end], None, None


def _world_size(group) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


@torch.compiler.disable  # collectives run eagerly; a compiled objective breaks its graph here
def gather_batch(*tensors: torch.Tensor | None, group=None) -> tuple[torch.Tensor | None, ...]:
    """Each tensor's rows of every rank of ``group`` (default: all ranks), concatenated in rank order.

    All tensors share their first (batch) dimension B_r, which may differ between ranks; a ``None``
    stays ``None``. Gradients flow back to each rank's own rows (module docstring). Without a process
    group, or with one rank, the tensors are returned as they are. Every rank of ``group`` must call
    this with the same number of tensors in the same order (it is a collective).
    """
    present = [t for t in tensors if t is not None]
    if not present or _world_size(group) == 1:
        return tensors
    rows = {t.shape[0] for t in present}
    if len(rows) != 1:
        raise ValueError(
            f"gather_batch needs tensors with one batch size, got first dimensions {sorted(rows)}"
        )
    size = torch.tensor([rows.pop()], dtype=torch.long, device=present[0].device)
    sizes = [torch.empty_like(size) for _ in range(_world_size(group))]
    dist.all_gather(sizes, size, group=group)
    counts = [int(s.item()) for s in sizes]
    return tuple(None if t is None else _GatherRows.apply(t, counts, group) for t in tensors)
