"""Dev-set evaluation across ranks: every rank predicts its share, rank 0 scores the whole set.

Rank ``r`` takes examples ``r, r + W, r + 2W, ...``; every rank runs the same number of forward
calls (a rank whose share ran out repeats a row and drops the result), because a ZeRO-3 model
gathers its parameters collectively in each forward. Predictions travel to rank 0, which puts
them back in dataset order and has the task score them (:meth:`~mlkd_scale.tasks.base.Task.score`:
GLUE's official metrics; SQuAD's post-processing and EM/F1 over the windows' ``[2, L]`` start/end
logits); the metrics are then broadcast, so every rank takes the same best-checkpoint decision.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from mlkd_scale.models.distillation_module import MODEL_INPUTS
from mlkd_scale.tasks.base import EncodedSplit, Task

if TYPE_CHECKING:
    from mlkd_scale.engine.distributed import DistInfo  # rank, world_size, device, is_main

#: ``predict(inputs) -> logits [B, C]`` (scores ``[B, 1]``; SQuAD ``[B, 2, L]``) for a batch of model inputs.
PredictFn = Callable[[dict], torch.Tensor]


@torch.no_grad()
def gather_predictions(predict: PredictFn, split: EncodedSplit, batch_size: int, info: DistInfo) -> torch.Tensor | None:
    """The ``[N, ...]`` fp32 predictions of the whole split on rank 0 (None elsewhere)."""
    mine = list(range(info.rank, len(split), info.world_size))
    batches = math.ceil(math.ceil(len(split) / info.world_size) / batch_size)
    outputs = []
    for b in range(batches):
        rows = mine[b * batch_size : (b + 1) * batch_size]
        batch = split.batch(rows or [0], info.device)
        logits = predict({k: batch[k] for k in MODEL_INPUTS if k in batch}).float()
        if rows:
            outputs.append(logits.cpu())
    local = torch.cat(outputs) if outputs else torch.empty(0)
    parts: list = [None] * info.world_size if info.is_main else None
    if dist.is_initialized() and info.world_size > 1:
        dist.gather_object(local, parts, dst=0)
    else:
        parts = [local]
    if not info.is_main:
        return None
    shape = next(p.shape[1:] for p in parts if p.numel())
    ordered = torch.empty(len(split), *shape)
    for rank, part in enumerate(parts):
        if part.numel():
            ordered[rank :: info.world_size] = part
    return ordered


def evaluate(
    predict: PredictFn, dev: dict[str, EncodedSplit], task: Task, batch_size: int, info: DistInfo
) -> dict[str, dict[str, float]]:
    """``{dev split: {metric: value}}`` on every rank (computed on rank 0, then broadcast)."""
    results: dict[str, dict[str, float]] = {}
    for name, split in dev.items():
        predictions = gather_predictions(predict, split, batch_size, info)
        if info.is_main:
            results[name] = task.score(split, predictions)
    if dist.is_initialized() and info.world_size > 1:
        box = [results]
        dist.broadcast_object_list(box, src=0)
        results = box[0]
    return results


def flat_metrics(results: dict[str, dict[str, float]]) -> dict[str, float]:
    """One flat dict: the first (selection) split's metrics as they are, others prefixed.

    MNLI: ``{"acc": matched, "mismatched/acc": mismatched}``; the keys become ``eval/<key>`` tags.
    """
    flat: dict[str, float] = {}
    for i, (split, metrics) in enumerate(results.items()):
        prefix = "" if i == 0 else split.removeprefix("validation_") + "/"
        flat.update({prefix + key: value for key, value in metrics.items()})
    return flat


def format_metrics(results: dict[str, dict[str, float]]) -> str:
    """``acc=0.8123 f1=0.8555`` (MNLI: ``acc=... mismatched/acc=...``) for stdout."""
    return " ".join(f"{key}={value:.4f}" for key, value in flat_metrics(results).items())
