"""TensorBoard logging on rank 0, and readers that tests use to check what was logged.

The training loop hands over loss terms as device tensors and never calls ``.item()`` itself:
converting here, once per logging step and in one transfer per device, keeps the hot loop free
of host-device syncs. Other ranks build the logger with ``enabled=False``, which makes every
call a no-op and creates no file, so callers need no ``if rank == 0`` around each call.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from typing_extensions import Self


class TensorBoardLogger:
    """Scalars and text for one run directory; also a context manager (closes on exit).

    ``purge_step``: when resuming from step N, pass N so TensorBoard hides the events a crashed
    run wrote after its last checkpoint (they would otherwise overlap the resumed curve).
    """

    def __init__(self, log_dir: str | Path, enabled: bool, purge_step: int | None = None):
        self.log_dir = Path(log_dir)
        self.enabled = enabled
        self._writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge_step)

    def scalars(self, step: int, mapping: Mapping[str, float | torch.Tensor]) -> None:
        if self._writer is None:
            return
        for tag, value in _to_floats(mapping).items():
            self._writer.add_scalar(tag, value, global_step=step)

    def text(self, tag: str, text: str) -> None:
        """E.g. the resolved spec as a Markdown code block (TensorBoard renders Markdown)."""
        if self._writer is not None:
            self._writer.add_text(tag, text)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _to_floats(mapping: Mapping[str, float | torch.Tensor]) -> dict[str, float]:
    """Python floats for every value; tensors of one device are copied to the host together."""
    out: dict[str, float] = {}
    by_device: dict[torch.device, list[tuple[str, torch.Tensor]]] = defaultdict(list)
    for tag, value in mapping.items():
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ValueError(f"scalar {tag!r} must have one element, got shape {tuple(value.shape)}")
            by_device[value.device].append((tag, value.detach().reshape(()).float()))
        else:
            out[tag] = float(value)
    for items in by_device.values():
        values = torch.stack([t for _, t in items]).tolist()  # one sync per device
        out.update({tag: v for (tag, _), v in zip(items, values)})
    return {tag: out[tag] for tag in mapping}  # keep the caller's order


def _accumulator(log_dir: str | Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def read_scalars(log_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in ``log_dir``'s event files: tag -> [(step, value), ...] in step order (for tests)."""
    acc = _accumulator(log_dir)
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def read_texts(log_dir: str | Path) -> dict[str, list[str]]:
    """Every text summary in ``log_dir``: tag -> [text, ...] (for tests). Tags carry TensorBoard's
    ``/text_summary`` suffix."""
    acc = _accumulator(log_dir)
    return {
        tag: [b"".join(e.tensor_proto.string_val).decode() for e in acc.Tensors(tag)]
        for tag in acc.Tags()["tensors"]
        if tag.endswith("/text_summary")
    }
