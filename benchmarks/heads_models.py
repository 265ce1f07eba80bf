"""The student of the head-count study and its head-count variants, and the check that they differ
only in how the attention is split (used by ``inference_heads.py``).

Changing ``num_attention_heads`` changes no weight shape in BERT (Q, K, V and W^O are d×d whatever
the split), so one state dict is loaded into one model per head count: the models share every
weight and differ only in how the attention is split.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import transformers
from transformers import AutoConfig, BertConfig, BertModel, PretrainedConfig


def student_config(
    layers: int = 4,
    hidden: int = 312,
    ffn: int = 1200,
    heads: int = 12,
    vocab: int = 30522,
    max_positions: int = 512,
) -> BertConfig:
    """A BERT config of the student's shape (default: MLKD-BERT4 / TinyBERT4, 4L-312-1200)."""
    return BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=ffn,
        max_position_embeddings=max_positions,
    )


@dataclass
class Student:
    """What every head-count variant is built from: a class, a config and one set of weights."""

    model_class: type
    config: PretrainedConfig
    state_dict: dict[str, torch.Tensor]
    source: str


def random_student(config: PretrainedConfig, seed: int = 0) -> Student:
    """Seeded random weights of ``config``'s shape: for timing only the shapes matter."""
    torch.manual_seed(seed)
    model = BertModel(config)
    shape = (
        f"random BertModel {config.num_hidden_layers}L-{config.hidden_size}-{config.intermediate_size} "
        f"(seed {seed})"
    )
    return Student(BertModel, config, model.state_dict(), shape)


def load_student(path: str) -> Student:
    """An exported student directory: its own class (from ``architectures``) and weights, in fp32."""
    config = AutoConfig.from_pretrained(path)
    arch = (config.architectures or [None])[0]
    model_class = getattr(transformers, arch, None) if arch else None
    if model_class is None:
        model_class = transformers.AutoModel._model_mapping[type(config)]
    model = model_class.from_pretrained(path, dtype=torch.float32)
    return Student(model_class, model.config, model.state_dict(), f"{path} ({model_class.__name__})")


def usable_heads(heads: list[int], hidden: int) -> tuple[list[int], list[int]]:
    """The head counts that divide the width (kept in the given order) and the ones dropped."""
    keep = [h for h in dict.fromkeys(heads) if h > 0 and hidden % h == 0]
    return keep, [h for h in heads if h not in keep]


def build_variant(
    student: Student, heads: int, attn: str, device: str, dtype: torch.dtype
) -> torch.nn.Module:
    """The student with ``heads`` attention heads and exactly the shared weights (strict load)."""
    config = copy.deepcopy(student.config)
    config.num_attention_heads = heads
    model = student.model_class(config)
    model.load_state_dict(student.state_dict, strict=True)
    model.set_attn_implementation(attn)
    if model.config._attn_implementation != attn:
        raise RuntimeError(f"asked for {attn} attention, the model uses {model.config._attn_implementation}")
    model.requires_grad_(False)
    return model.to(device=device, dtype=dtype).eval()


def make_inputs(batch: int, seq: int, vocab: int, device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded full-length token ids (no padding: every model of a cell does the same work)."""
    g = torch.Generator().manual_seed(seed)
    low = min(1000, vocab // 2)
    ids = torch.randint(low, vocab, (batch, seq), generator=g)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}


def forward(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """One PyTorch inference forward: the first output (the last hidden states, or the logits)."""
    with torch.inference_mode():
        return model(**inputs)[0]


def param_count(model: torch.nn.Module) -> int:
    """Parameters of ``model``: the same for every head count, or the study compares other models."""
    return sum(p.numel() for p in model.parameters())


# sanity: the head split matters, nothing else does


@dataclass
class Sanity:
    """What :func:`sanity_check` found: parameter counts and how far the head counts' outputs differ."""

    param_counts: dict[int, int]
    min_pair_diff: float  # smallest max-abs difference between two head counts' fp32 outputs
    min_pair: tuple[int, int] | None
    tolerance: float  # 20x the fp32 noise floor (sdpa vs eager, same heads), at least 1e-6 relative
    noise: float


def sanity_check(
    student: Student, models: dict[int, torch.nn.Module], attn: str, device: str, dtype: torch.dtype
) -> Sanity:
    """Raise unless the variants share their parameters, give finite outputs in ``dtype`` and
    pairwise different outputs in fp32 (built afresh when timing in another dtype)."""
    heads = list(models)
    counts = {h: param_count(m) for h, m in models.items()}
    if len(set(counts.values())) != 1:
        raise RuntimeError(f"head counts change the parameter count: {counts}")
    reference = models[heads[0]].state_dict()
    for h in heads[1:]:
        for name, tensor in models[h].state_dict().items():
            if not torch.equal(tensor, reference[name]):
                raise RuntimeError(f"the {h}-head model's {name} differs from the {heads[0]}-head model's")

    inputs = make_inputs(2, 16, student.config.vocab_size, device, seed=1)
    for h, model in models.items():
        out = forward(model, inputs)
        if not torch.isfinite(out).all():
            raise RuntimeError(f"the {h}-head model gives non-finite outputs in {dtype}")

    if dtype == torch.float32:
        fp32 = models
    else:
        fp32 = {h: build_variant(student, h, attn, device, torch.float32) for h in heads}
    outs = {h: forward(m, inputs).float() for h, m in fp32.items()}
    # Noise floor: the same head count through the other attention kernel (same maths, other
    # summation order). A real change of head split must stand well clear of it.
    other = "eager" if attn != "eager" else "sdpa"
    twin = forward(build_variant(student, heads[0], other, device, torch.float32), inputs).float()
    noise = (twin - outs[heads[0]]).abs().max().item()
    scale = max(out.abs().max().item() for out in outs.values())
    tolerance = max(20.0 * noise, 1e-6 * (1.0 + scale))
    min_diff, min_pair = math.inf, None
    for i, a in enumerate(heads):
        for b in heads[i + 1 :]:
            diff = (outs[a] - outs[b]).abs().max().item()
            if diff < min_diff:
                min_diff, min_pair = diff, (a, b)
    if min_pair is not None and not min_diff > tolerance:
        raise RuntimeError(
            f"the {min_pair[0]}- and {min_pair[1]}-head models give the same outputs "
            f"(max |diff| {min_diff:.2e} "
            f"<= {tolerance:.2e}): the head split is not taking effect"
        )
    return Sanity(counts, min_diff, min_pair, tolerance, noise)

