"""Feature taps: the intermediate tensors the distillation losses need, from stock HF models.

One forward of a BERT-like ``transformers`` model (``BertModel`` or any of its task heads, and
models with the same module layout such as RoBERTa or ELECTRA) yields, through forward hooks on
the unmodified modules:

* ``embeddings``  — output of the embedding layer (after its LayerNorm and dropout)   [B, L, d]
* ``context[n]``  — layer n's concatenated per-head context softmax(QKᵀ/√d_k)V, i.e. the input of
                    ``attention.output.dense`` (before the output projection W^O)        [B, L, d]
* ``hidden[n]``   — layer n's output hidden state (after the FFN residual + LayerNorm)   [B, L, d]
* ``qkv[n]``      — layer n's query, key and value projections (MiniLMv2 relations)      3 × [B, L, d]
* ``attentions[n]`` — layer n's attention probabilities softmax(QKᵀ/√d_k + mask)      [B, H, L, L]
* ``attention_scores[n]`` — layer n's unnormalised scores QKᵀ/√d_k with masked entries at the
                    dtype's minimum (TinyBERT's attention loss)                         [B, H, L, L]
                    (both maps are computed explicitly in the requested layers only, see
                    :mod:`~mlkd_scale.models.selective_attention`)
* ``cls``         — the final layer's [CLS] vector (not the tanh pooler)                 [B, d]
* ``logits``      — the head's logits when the model has one (:func:`head_logits`)      [B, C]
                    a question-answering head's start and end logits, stacked        [B, 2, L]

Layers are numbered 1..N as in the paper; 0 is the embedding layer. Only what the
:class:`TapRequest` asks for is hooked and kept, so an objective that needs three layers of the
teacher holds three layers' tensors, not all of them. SDPA / flash attention stays on: the
context vector is an input of a ``Linear``, not an attention map.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from mlkd_scale.models.selective_attention import mark_attention_maps, unmark_attention_maps


@dataclass(frozen=True)
class TapRequest:
    """What one model's forward must expose. Layer numbers are 1-based."""

    embeddings: bool = False
    context_layers: frozenset[int] = frozenset()
    hidden_layers: frozenset[int] = frozenset()
    qkv_layers: frozenset[int] = frozenset()
    attention_layers: frozenset[int] = frozenset()
    attention_scores_layers: frozenset[int] = frozenset()
    cls: bool = False
    logits: bool = False

    def merged(self, other: TapRequest) -> TapRequest:
        """The union of two requests (used when several loss terms share one forward)."""
        return TapRequest(
            embeddings=self.embeddings or other.embeddings,
            context_layers=self.context_layers | other.context_layers,
            hidden_layers=self.hidden_layers | other.hidden_layers,
            qkv_layers=self.qkv_layers | other.qkv_layers,
            attention_layers=self.attention_layers | other.attention_layers,
            attention_scores_layers=self.attention_scores_layers | other.attention_scores_layers,
            cls=self.cls or other.cls,
            logits=self.logits or other.logits,
        )


@dataclass
class Features:
    """The tensors captured in one forward; absent entries were not requested."""

    embeddings: torch.Tensor | None = None
    context: dict[int, torch.Tensor] = field(default_factory=dict)
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    qkv: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    attentions: dict[int, torch.Tensor] = field(default_factory=dict)
    attention_scores: dict[int, torch.Tensor] = field(default_factory=dict)
    cls: torch.Tensor | None = None
    logits: torch.Tensor | None = None


def encoder_modules(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """The embedding module and the list of Transformer layers of a BERT-like model.

    Works for the bare backbone and for task-head models (through ``base_model``).
    """
    backbone = getattr(model, "base_model", model)
    embeddings = getattr(backbone, "embeddings", None)
    layers = getattr(getattr(backbone, "encoder", None), "layer", None)
    if embeddings is None or not isinstance(layers, nn.ModuleList):
        raise TypeError(
            f"{type(model).__name__} does not have the BERT layout (base_model.embeddings and "
            "base_model.encoder.layer); mlkd_scale taps BERT-like encoders only"
        )
    return embeddings, layers


def head_logits(output, model: nn.Module | None = None) -> torch.Tensor:
    """The prediction of a model output: ``logits`` [B, C], or a QA head's ``stack(start, end)`` [B, 2, L]."""
    logits = getattr(output, "logits", None)
    if logits is None and getattr(output, "start_logits", None) is not None:
        logits = torch.stack([output.start_logits, output.end_logits], dim=1)
    if logits is None:
        name = type(model).__name__ if model is not None else "the model"
        raise ValueError(f"{name} has no prediction head; logits cannot be tapped")
    return logits


class FeatureTap:
    """Hooks registered once on a model; each :meth:`__call__` runs a forward and returns Features.

    Use as a context manager, or call :meth:`remove` to take every hook off the model.
    """

    def __init__(self, model: nn.Module, request: TapRequest):
        self.model = model
        self.request = request
        self._store: dict = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        embeddings, layers = encoder_modules(model)
        num_layers = len(layers)
        wanted = (
            request.context_layers
            | request.hidden_layers
            | request.qkv_layers
            | request.attention_layers
            | request.attention_scores_layers
        )
        bad = sorted(n for n in wanted if not 1 <= n <= num_layers)
        if bad:
            raise ValueError(f"layers {bad} requested from a model with {num_layers} layers (valid: 1..{num_layers})")
        both = sorted(request.attention_layers & request.attention_scores_layers)
        if both:
            raise ValueError(f"layers {both} are asked for both attention probabilities and scores; ask for one")
        kinds = {n: "probs" for n in request.attention_layers} | {n: "scores" for n in request.attention_scores_layers}
        self._mapped_attention = {layers[n - 1].attention.self: kind for n, kind in sorted(kinds.items())}
        self._attention_before = (
            mark_attention_maps(model, self._mapped_attention) if self._mapped_attention else None
        )
        if request.embeddings:
            self._hook(embeddings, "embeddings")
        for n in request.context_layers:
            self._pre_hook(layers[n - 1].attention.output.dense, ("context", n))
        for n in request.hidden_layers | ({num_layers} if request.cls else set()):
            self._hook(layers[n - 1], ("hidden", n))
        for n in request.qkv_layers:
            attn = layers[n - 1].attention.self
            for part in ("query", "key", "value"):
                self._hook(getattr(attn, part), (part, n))
        for n in request.attention_layers:
            self._hook(layers[n - 1].attention.self, ("attentions", n), index=1)
        for n in request.attention_scores_layers:
            self._hook(layers[n - 1].attention.self, ("attention_scores", n), index=1)
        self._num_layers = num_layers

    def _hook(self, module: nn.Module, key, index: int = 0) -> None:
        def hook(_module, _args, output):
            self._store[key] = output[index] if isinstance(output, tuple) else output

        self._handles.append(module.register_forward_hook(hook))

    def _pre_hook(self, module: nn.Module, key) -> None:
        def hook(_module, args):
            self._store[key] = args[0]

        self._handles.append(module.register_forward_pre_hook(hook))

    def __call__(self, **inputs) -> Features:
        """Run the model on ``inputs`` (input_ids, attention_mask, ...) and collect the features."""
        self._store.clear()
        output = self.model(**inputs)
        store, self._store = self._store, {}
        r = self.request
        feats = Features(
            embeddings=store.get("embeddings"),
            context={n: store[("context", n)] for n in r.context_layers},
            hidden={n: store[("hidden", n)] for n in r.hidden_layers},
            qkv={n: (store[("query", n)], store[("key", n)], store[("value", n)]) for n in r.qkv_layers},
            attentions={n: store[("attentions", n)] for n in r.attention_layers},
            attention_scores={n: store[("attention_scores", n)] for n in r.attention_scores_layers},
        )
        if r.cls:
            feats.cls = store[("hidden", self._num_layers)][:, 0]
        if r.logits:
            feats.logits = head_logits(output, self.model)
        return feats

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._store.clear()
        if self._attention_before is not None:
            unmark_attention_maps(self.model, self._mapped_attention, self._attention_before)
            self._attention_before = None

    def __enter__(self) -> FeatureTap:  # noqa: PYI034
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

