"""The task sampler: an exactly resumable, world-size aware order of a task's train examples.

A task's train set fits in memory once tokenized, so every rank reads and encodes the whole split
(:meth:`~mlkd_scale.tasks.base.Task.load_data`) and :class:`EpochSampler` hands each rank its share:

* epoch ``e`` visits the examples in a permutation drawn from ``(seed, stream, e)`` — the same on
  every rank — padded by wrapping to a multiple of the world size and split ``perm[rank::world]``
  (like ``torch.utils.data.DistributedSampler``);
* micro batches are always full: the last one of an epoch continues into the next epoch, so the
  data is one endless stream and a run's budget can be any number of steps;
* the position is ``(epoch, index)`` into this rank's share: a checkpoint stores it
  (:meth:`EpochSampler.state_dict`) and a resumed run continues with exactly the samples it had
  not seen yet.
"""

from __future__ import annotations

import math

import numpy as np


def steps_for(epochs: float, max_steps: int | None, num_examples: int, global_batch: int) -> int:
    """Optimizer steps of a stage: ``max_steps``, else ceil(epochs x examples / global batch)."""
    if max_steps is not None:
        return max_steps
    return max(1, math.ceil(epochs * num_examples / global_batch))


class EpochSampler:
    """This rank's micro batches over a dataset of ``size`` examples, epoch after epoch (see module doc).

    ``stream`` separates the permutations of two users of the same seed (e.g. the two stages).
    """

    def __init__(self, size: int, micro_batch_size: int, rank: int, world_size: int, seed: int, stream: int = 0):
        if size < 1:
            raise ValueError("EpochSampler needs at least one example")
        self.size = size
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.stream = stream
        self.epoch = 0
        self.index = 0
        self._share = self._share_of(0)

    @property
    def per_rank(self) -> int:
        """Examples this rank sees per epoch (the padded share)."""
        return math.ceil(self.size / self.world_size)

    def _share_of(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.stream, epoch])
        perm = rng.permutation(self.size)
        padded = np.resize(perm, self.per_rank * self.world_size)  # wraps around, as DistributedSampler pads
        return padded[self.rank :: self.world_size]

    def next_indices(self) -> list[int]:
        """The example indices of the next micro batch (always ``micro_batch_size`` of them)."""
        out: list[int] = []
        while len(out) < self.micro_batch_size:
            if self.index >= len(self._share):
                self.epoch += 1
                self.index = 0
                self._share = self._share_of(self.epoch)
            take = min(self.micro_batch_size - len(out), len(self._share) - self.index)
            out.extend(self._share[self.index : self.index + take].tolist())
            self.index += take
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "size": self.size, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        if (state["size"], state["world_size"]) != (self.size, self.world_size):
            raise ValueError(
                f"the checkpoint's data position is for {state['size']} examples on {state['world_size']} ranks, "
                f"this run has {self.size} examples on {self.world_size} ranks; resume with the same data and "
                "world size, or start the stage afresh"
            )
        self.epoch, self.index = state["epoch"], state["index"]
        self._share = self._share_of(self.epoch)


# ---- a toy task for the quick-start ---------------------------------------------------------------
