"""What the stage runner asks of an evaluator (dev metrics, held-out scores), and what one evaluation is."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass
class Evaluation:
    """One evaluation: ``scalars`` are logged, ``value`` selects the best checkpoint, ``record`` is
    kept with the best (``{"step", "value", **record}``) and ``history`` in ``eval_history``."""

    scalars: dict[str, float]
    value: float
    record: dict
    history: object


class Evaluator(Protocol):
    """Dev metrics or held-out scores during a stage, and the best-checkpoint rule."""

    #: True: every evaluation is checkpointed (task stages); False: only a new best is.
    checkpoint_each: bool

    def due(self, step: int, stop_at: int, total: int) -> bool: ...

    def evaluate(self) -> Evaluation:
        """Evaluate the model now (collective; the same result on every rank)."""

    def is_better(self, value: float, best: dict | None) -> bool: ...

    def report(self, evaluation: Evaluation, best: dict | None, step: int, run_step: int) -> tuple[dict, str]:
        """The scalars to log for ``evaluation`` (with ``best`` known) and the line to print."""
