"""Loading the teacher: frozen, in eval mode, in its inference dtype."""

from __future__ import annotations

import logging

import torch
from transformers import AutoModel, PreTrainedModel

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

log = logging.getLogger("mlkd_scale")


def load_teacher(path: str, dtype: str = "bf16", model_class=AutoModel, warn_missing: bool = False) -> PreTrainedModel:
    """Load a teacher that is never trained: no grads, eval mode (no dropout), ``dtype`` weights.

    ``path`` is a local Hugging Face directory or a hub name. ``model_class`` picks the head
    (``AutoModel`` for general distillation, ``AutoModelForMaskedLM`` for the distilbert preset's
    MLM terms, a task class for task distillation). With ``warn_missing`` (rank 0), weights the
    checkpoint lacks, e.g. the MLM head ``cls.predictions.*`` of a sentence encoder, are logged as
    a warning: those are freshly initialised, so the teacher's predictions from them mean nothing.
    """
    teacher, info = model_class.from_pretrained(path, dtype=DTYPES[dtype], output_loading_info=True)
    missing = sorted(info.get("missing_keys", []))
    if warn_missing and missing:
        heads = sorted({".".join(key.split(".")[:2]) for key in missing})
        log.warning(
            "teacher %s has no trained weights for %s (%d missing, e.g. %s): %s initialised them at random, "
            "so the loss terms that read them learn noise; use a teacher checkpoint with this head",
            path, ", ".join(heads), len(missing), missing[0], type(teacher).__name__,
        )
    return freeze(teacher)


def freeze(model: PreTrainedModel) -> PreTrainedModel:
    """Put a model in inference state: eval mode and every parameter frozen."""
    model.eval()
    model.requires_grad_(False)
    return model
