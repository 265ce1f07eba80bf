"""Learning-rate schedule and optimizer parameter groups."""

from __future__ import annotations

import math

import torch
from torch import nn

from mlkd_scale.spec import TrainSpec


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, decay: str, min_lr_ratio: float) -> float:
    """Factor on the peak lr at optimizer step ``step`` (0-based): linear warm-up, then decay.

    linear / cosine decay go from 1 to ``min_lr_ratio`` at ``total_steps``; constant stays at 1.
    """
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    shape = 1 - progress if decay == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    return min_lr_ratio + (1 - min_lr_ratio) * shape


def build_optimizer(
    module: nn.Module,
    train: TrainSpec,
    total_steps: int,
    warmup_steps: int,
    cpu_offload: bool = False,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with no weight decay on biases and LayerNorm weights, and its LambdaLR schedule.

    Only parameters that require grad are optimised (frozen projections stay out). The optimizer is
    torch's fused AdamW, which runs on CUDA and, since torch 2.4, on CPU (on a 4L-312 student it took
    19 ms per step on one CPU thread against 134 ms for the default per-tensor loop); with
    ``cpu_offload`` (the DeepSpeed config offloads the optimizer, see :func:`offloads_optimizer`)
    it is DeepSpeed's vectorised ``DeepSpeedCPUAdam`` in AdamW mode, which ZeRO-Offload requires and
    which steps the fp32 master weights on the host; its C++ op is JIT-built on first use (minutes).
    """
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "LayerNorm" in name else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": train.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if cpu_offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(groups, lr=train.lr, betas=train.adam_betas, eps=train.adam_eps, adamw_mode=True)
    else:
        optimizer = torch.optim.AdamW(groups, lr=train.lr, betas=train.adam_betas, eps=train.adam_eps, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_multiplier(step, total_steps, warmup_steps, train.decay, train.min_lr_ratio),
    )
    return optimizer, scheduler


def offloads_optimizer(deepspeed_config: dict) -> bool:
    """Whether a (resolved) DeepSpeed config puts the optimizer on the host (``offload_optimizer``
    device cpu or nvme, or the deprecated ``cpu_offload``), read with DeepSpeed's own parser."""
    from deepspeed.runtime.zero.config import get_zero_config
    from deepspeed.runtime.zero.offload_config import OffloadDeviceEnum

    offload = get_zero_config(deepspeed_config).offload_optimizer
    return offload is not None and offload.device in (OffloadDeviceEnum.cpu, OffloadDeviceEnum.nvme)
