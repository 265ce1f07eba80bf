"""Keep loss arithmetic in fp32 even inside an autocast region."""

from __future__ import annotations

import functools

import torch


def fp32_loss(fn):
    """Run ``fn`` with autocast off on its inputs' device.

    Every loss casts its inputs to fp32 itself; without this, an enclosing ``torch.autocast`` would
    still run its matmuls in bf16/fp16, and softmax/KL relations in half precision are badly wrong.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
        with torch.autocast(device_type=device, enabled=False):
            return fn(*args, **kwargs)

    return wrapper
