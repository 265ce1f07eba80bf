"""Pieces every training loop shares: the DeepSpeed engine, one optimizer step, logged scalars.

Used by the general-distillation :class:`~mlkd_scale.engine.general_kd.Trainer` and by the task stages
(:mod:`mlkd_scale.engine.task.stage`), so both build their engine, step and log the same way.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable

import deepspeed
import torch
from torch import nn

from mlkd_scale.engine.checkpoints.safe_load import install_checkpoint_engine
from mlkd_scale.engine.faults import ensure_nonfinite_skipping, poison_nonfinite
from mlkd_scale.engine.schedule import build_optimizer, offloads_optimizer
from mlkd_scale.spec import TrainSpec
from mlkd_scale.spec.plan import Plan

#: ``forward(batch) -> (total loss, {term: detached value})`` for one micro batch.
LossFn = Callable[[dict], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def build_engine(module: nn.Module, train: TrainSpec, plan: Plan, lr: float | None = None):
    """AdamW + schedule for ``plan``'s steps, wrapped with ``module`` in a DeepSpeed engine.

    ``lr`` overrides ``train.lr`` (a task stage has its own). The AdamW is DeepSpeed's CPU Adam when
    the config offloads the optimizer. Returns ``(engine, scheduler)``. Every engine skips optimizer
    steps with non-finite gradients (see :mod:`mlkd_scale.engine.faults`).
    """
    if lr is not None:
        train = train.model_copy(update={"lr": lr})
    optimizer, scheduler = build_optimizer(
        module,
        train,
        plan.total_steps,
        plan.warmup_steps,
        cpu_offload=offloads_optimizer(plan.deepspeed_config),
    )
    engine, _, _, scheduler = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=scheduler, config=plan.deepspeed_config
    )
    if engine.zero_optimization_stage() == 0 and engine.dp_world_size == 1:
        # One data-parallel rank has nothing to all-reduce, yet DeepSpeed would still flatten every
        # gradient into a bucket and copy it back after each backward (7% of a 4L-312 student's
        # step on CPU).
        engine.enable_backward_allreduce = False
    ensure_nonfinite_skipping(engine)
    install_checkpoint_engine(engine)  # checkpoints load without running code, shards are fsynced
    return engine, scheduler


def optimizer_step(engine, next_batch: Callable[[], dict], loss_fn: LossFn, accumulation: int) -> dict:
    """One optimizer step over ``accumulation`` micro batches; the mean loss terms (on device).

    ``engine.step()`` runs after every micro batch: DeepSpeed only steps the optimizer at the
    accumulation boundary. ``total`` is added to the returned terms. A non-finite loss is made to
    give non-finite gradients, so the optimizer skips the step (:func:`poison_nonfinite`).
    """
    sums: dict[str, torch.Tensor] = {}
    for _ in range(accumulation):
        total, terms = loss_fn(next_batch())
        engine.backward(poison_nonfinite(total))
        engine.step()
        for name, value in {"total": total.detach(), **terms}.items():
            sums[name] = sums.get(name, 0) + value.float()
    return {name: value / accumulation for name, value in sums.items()}


def optimizer_scalars(engine, scheduler, device: torch.device) -> dict[str, float]:
    """lr, grad norm, loss scale, skipped steps and peak memory: the per-step health of a run
    (TensorBoard tags). ``train/nonfinite_steps_skipped`` is DeepSpeed's count of optimizer steps
    skipped for non-finite gradients (fp16 loss-scale overflows included), kept across resumes."""
    return {
        "train/lr": scheduler.get_last_lr()[0],
        "train/grad_norm": as_float(engine.get_global_grad_norm()),
        "train/loss_scale": loss_scale(engine),
        "train/nonfinite_steps_skipped": float(engine.skipped_steps),
        "memory/peak_gib": peak_memory_gib(device),
    }


class Window:
    """Loss terms summed on device over the steps between two logging points."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.start = time.perf_counter()

    def add(self, terms: dict[str, torch.Tensor]) -> None:
        for name, value in terms.items():
            self.sums[name] = self.sums.get(name, 0) + value
        self.steps += 1

    def elapsed(self) -> float:
        return max(time.perf_counter() - self.start, 1e-9)

    def global_means(self) -> dict[str, float]:
        """Means over the window and over ranks: one all-reduce per logging step, not per step."""
        names = sorted(self.sums)
        stacked = torch.stack([self.sums[n] for n in names]) / self.steps
        torch.distributed.all_reduce(stacked)
        stacked /= torch.distributed.get_world_size()
        return dict(zip(names, stacked.tolist()))


def as_float(value) -> float:
    if value is None:
        return float("nan")
    return float(value.item() if isinstance(value, torch.Tensor) else value)


def loss_scale(engine) -> float:
    scale = getattr(engine.optimizer, "cur_scale", None) or getattr(engine.optimizer, "loss_scale", None)
    return as_float(scale) if scale is not None else 1.0


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
