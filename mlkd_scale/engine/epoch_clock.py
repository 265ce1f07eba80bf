"""Training seconds per epoch of a task stage (what the teacher cache is measured by).

An epoch is ``N / G`` optimizer steps (N train examples, G the global batch); step ``s`` (1-based)
belongs to epoch ``floor((s - 1) · G / N)``. The clock sums the wall time of the optimizer steps
only — dev evaluation and checkpoints between steps are not counted — so the figures compare the
training work itself. It synchronises the accelerator at the last step of each epoch (a no-op on
CPU), so queued device work is counted in the epoch that issued it, to within a step.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class EpochClock:
    """``start()`` before an optimizer step, ``stop(step)`` after it; :meth:`report` lists the epochs."""

    def __init__(self, examples: int, global_batch: int, sync: Callable[[], None] = lambda: None):
        self.examples, self.global_batch, self.sync = examples, global_batch, sync
        self.epochs: list[dict] = []  # {"epoch", "steps", "seconds"}, in order
        self._started = 0.0

    def epoch_of(self, step: int) -> int:
        return (step - 1) * self.global_batch // self.examples

    def start(self) -> None:
        self._started = time.perf_counter()

    def stop(self, step: int, last: bool = False) -> float | None:
        """Count the step that just ran; the epoch's seconds when it was the epoch's (or the stage's) last."""
        epoch = self.epoch_of(step)
        ends = last or self.epoch_of(step + 1) != epoch
        if ends:
            self.sync()
        seconds = time.perf_counter() - self._started
        if not self.epochs or self.epochs[-1]["epoch"] != epoch:
            self.epochs.append({"epoch": epoch, "steps": 0, "seconds": 0.0})
        current = self.epochs[-1]
        current["steps"] += 1
        current["seconds"] += seconds
        return current["seconds"] if ends else None

    def report(self) -> list[dict]:
        """The epochs timed in this launch (a resumed stage's first one may be partial: see ``steps``)."""
        return [dict(e) for e in self.epochs]
