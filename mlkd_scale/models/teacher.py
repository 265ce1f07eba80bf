"""Loading the teacher: frozen, in eval mode, in its inference dtype."""

from __future__ import annotations

import torch
from transformers import AutoModel, PreTrainedModel

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def load_teacher(path: str, dtype: str = "bf16", model_class=AutoModel) -> PreTrainedModel:
    """Load a teacher that is never trained: no grads, eval mode (no dropout), ``dtype`` weights.

    ``path`` is a local Hugging Face directory or a hub name. ``model_class`` picks the head
    (``AutoModel`` for general distillation, a task class for task distillation).
    """
    teacher = model_class.from_pretrained(path, dtype=DTYPES[dtype])
    return freeze(teacher)


def freeze(model: PreTrainedModel) -> PreTrainedModel:
    """Put a model in inference state: eval mode and every parameter frozen."""
    model.eval()
    model.requires_grad_(False)
    return model
