"""Attention maps only in the layers a loss reads them from; SDPA everywhere else.

TinyBERT's attention loss needs the unnormalised scores QKᵀ/√d_k + mask of the mapped layers only
(other losses may want the probabilities softmax(QKᵀ/√d_k + mask)), yet ``set_attn_implementation("eager")`` materialises them in every layer (and
``output_attentions=True`` keeps them all). This module registers one more Hugging Face attention
implementation, ``"mlkd_selective"``: a layer whose self-attention module is marked by
:func:`mark_attention_maps` computes its scores and probabilities explicitly and returns, as the
attention weights, the probabilities (kind ``"probs"``, what the eager implementation returns) or
the scores before the softmax (kind ``"scores"``); every other layer calls the stock SDPA function.
With a 12-layer teacher and a 4-layer student, 8 of the teacher's 12 layers keep SDPA.

Masks are the SDPA ones (``None`` when nothing is padded, else a boolean ``[B, 1, L, L]``); the
explicit path fills masked scores with the dtype's minimum, which gives the same probabilities as
the eager implementation's additive mask.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface

SELECTIVE_ATTENTION = "mlkd_selective"
_MARK = "mlkd_returns_attention_map"
#: What a marked module returns as its attention weights.
MAP_KINDS = ("probs", "scores")


def selective_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """HF attention-interface function: explicit maps for marked modules, SDPA otherwise.

    query, key, value [B, H, L, d_k]; returns the context [B, L, H, d_k] and the map its mark asks
    for, [B, H, L, L]: probabilities or scores (``None`` for an unmarked module).
    """
    kind = getattr(module, _MARK, None)
    if kind is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    scores = torch.matmul(query, key.transpose(-1, -2)).mul_(scaling)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores.masked_fill_(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores.add_(attention_mask)
    probs = torch.softmax(scores, dim=-1)
    attended = nn.functional.dropout(probs, p=dropout, training=module.training)
    context = torch.matmul(attended, value).transpose(1, 2).contiguous()
    return context, scores if kind == "scores" else probs


AttentionInterface.register(SELECTIVE_ATTENTION, selective_attention_forward)
AttentionMaskInterface.register(SELECTIVE_ATTENTION, sdpa_mask)


def mark_attention_maps(model: nn.Module, attention_modules: dict[nn.Module, str] | list[nn.Module]) -> str:
    """Switch ``model`` to the selective implementation and mark the modules whose maps are read.

    ``attention_modules`` maps each self-attention module to the kind of map it returns
    (``"probs"`` or ``"scores"``); a plain list marks them all for probabilities.

    Returns the implementation the model ran before, for :func:`unmark_attention_maps`. Only
    models on ``sdpa`` or ``eager`` can switch (a flash-attention model's masks differ).
    """
    previous = model.config._attn_implementation
    if previous not in ("sdpa", "eager", SELECTIVE_ATTENTION):
        raise ValueError(
            f"attention maps were requested from a model running '{previous}' attention; load it with "
            "attn_implementation='sdpa' (the layers whose maps are read then compute them explicitly)"
        )
    model.set_attn_implementation(SELECTIVE_ATTENTION)
    if model.config._attn_implementation != SELECTIVE_ATTENTION:  # the class cannot switch (HF only warns)
        raise ValueError(
            f"{type(model).__name__} cannot switch its attention implementation at run time, so its "
            "attention maps cannot be tapped; use a model class built on transformers' AttentionInterface"
        )
    kinds = attention_modules if isinstance(attention_modules, dict) else dict.fromkeys(attention_modules, "probs")
    for module, kind in kinds.items():
        if kind not in MAP_KINDS:
            raise ValueError(f"attention map kind {kind!r} is not one of {MAP_KINDS}")
        setattr(module, _MARK, kind)
    return previous


def unmark_attention_maps(model: nn.Module, attention_modules, previous: str) -> None:
    """Undo :func:`mark_attention_maps`."""
    for module in attention_modules:
        if hasattr(module, _MARK):
            delattr(module, _MARK)
    model.set_attn_implementation(previous)
