"""A document-level shuffle buffer whose whole state can be saved and restored.

``datasets``' own ``IterableDataset.shuffle`` buffer is refilled with new data on resume (its
contents are not in ``state_dict``), which would lose or repeat documents. This buffer keeps its
documents and its RNG state in :meth:`state_dict`, so a resumed stream continues exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

Doc = tuple[str, str]  # (document id, text)


class ShuffleBuffer:
    """Holds up to ``size`` documents and hands out a uniformly random one per call (0 = no shuffle).

    The source is an endless stream (epochs follow each other), so the buffer is never drained:
    at steady state each call pulls one document in and lets one random document out.
    """

    def __init__(self, size: int, seed: int | list[int]):
        if size < 0:
            raise ValueError(f"shuffle buffer size must be >= 0, got {size}")
        self.size = size
        self.rng = np.random.default_rng(seed)
        self.items: list[Doc] = []

    def next(self, pull: Callable[[], Doc]) -> Doc:
        if self.size == 0:
            return pull()
        while len(self.items) < self.size:
            self.items.append(pull())
        i = int(self.rng.integers(len(self.items)))
        doc = self.items[i]
        self.items[i] = self.items[-1]
        self.items.pop()
        return doc

    def state_dict(self) -> dict:
        """Buffered documents and the RNG state, as plain Python values (a copy)."""
        return {"items": [list(d) for d in self.items], "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.items = [(str(i), str(t)) for i, t in state["items"]]
        self.rng.bit_generator.state = state["rng"]
