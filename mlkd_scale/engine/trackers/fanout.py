"""Every tracker of ``logging.report_to`` behind one logger, and what makes a resume continue them.

TensorBoard gets each row at once: a resume passes ``purge_step`` and TensorBoard hides what a
crashed launch wrote after its checkpoint. MLflow and W&B cannot un-log a step, so they get a row
only once a checkpoint covers its step (no resume can train that step again):

* rows wait in memory (``pending``) until ``CheckpointManager`` commits a checkpoint of their step
  or a later one (its ``commit_hooks`` call :meth:`Trackers.commit`), then go out together; a row
  logged for a step that is already committed (a dev evaluation after the save) goes out at once;
* a launch that dies loses only rows no checkpoint covers, and its resume logs exactly those again;
* ``<output_dir>/trackers.json`` keeps each run's id and ``sent_through`` (the newest step sent).
  A launch with ``resume_step > 0`` continues the recorded runs and drops rows at steps up to
  ``sent_through`` (only a resume from an older checkpoint has such rows; the trackers keep the
  first values); a launch from step 0 after rows were sent is a new run (the folder was restarted
  from scratch) and opens new tracker runs.

A tracker that cannot start (package missing, bad URI, unwritable folder) is a ``SpecError``
raised on every rank before training; a tracker that fails later keeps its rows for the next commit
and is reported once.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

from mlkd_scale.engine.checkpoints.files import atomic_write_text
from mlkd_scale.engine.distributed import from_rank0
from mlkd_scale.engine.trackers.mlflow_tracker import MlflowTracker
from mlkd_scale.engine.trackers.tensorboard import TensorBoardLogger, _to_floats
from mlkd_scale.engine.trackers.wandb_tracker import WandbTracker
from mlkd_scale.spec import RunSpec, SpecError

if TYPE_CHECKING:
    from typing_extensions import Self

    from mlkd_scale.engine.checkpoints.manager import CheckpointManager

log = logging.getLogger("mlkd_scale")
STATE_FILE = "trackers.json"
Row = tuple[int, dict[str, float]]


class Tracker(Protocol):
    """What :class:`Trackers` needs of MLflow's and W&B's adapters."""

    name: str

    def record(self) -> dict: ...
    def log(self, rows: list[Row]) -> None: ...
    def text(self, tag: str, text: str) -> None: ...
    def close(self) -> None: ...


class Trackers:
    """TensorBoardLogger's interface (``scalars``, ``text``, ``flush``, ``close``) over every tracker."""

    def __init__(self, tensorboard: TensorBoardLogger | None, remote: list[Tracker], state_file: Path | None,
                 committed: int = 0, floor: int = 0):
        self.tensorboard = tensorboard
        self.remote = remote
        self.state_file = state_file
        self.committed = committed  # newest step a checkpoint covers
        self.floor = floor  # rows up to here were sent by an earlier launch
        self.pending: list[Row] = []
        self._failed: set[str] = set()
        self._hook = None

    def scalars(self, step: int, mapping: Mapping[str, float | torch.Tensor]) -> None:
        """Log ``mapping`` at ``step``: TensorBoard now, the others once a checkpoint covers ``step``."""
        if self.tensorboard is None and not self.remote:
            return
        floats = _to_floats(mapping)
        if self.tensorboard is not None:
            self.tensorboard.scalars(step, floats)
        if not self.remote or step <= self.floor:
            return
        self.pending.append((step, floats))
        if step <= self.committed:
            self._send()

    def commit(self, step: int) -> None:
        """A checkpoint of ``step`` is complete: flush TensorBoard (its writer thread writes events
        asynchronously; the rows a checkpoint covers are never logged again), send every row the
        checkpoint covers to the other trackers, record ``sent_through``."""
        self.committed = max(self.committed, step)
        if self.tensorboard is not None:
            self.tensorboard.flush()
        self._send()

    def _send(self) -> None:
        ready = [row for row in self.pending if row[0] <= self.committed]
        if not ready:
            return
        failed = False
        for tracker in self.remote:
            try:
                tracker.log(ready)
            except Exception as error:  # noqa: BLE001 - keep training; these rows are retried at the next commit
                failed = True
                if tracker.name not in self._failed:
                    self._failed.add(tracker.name)
                    log.warning("logging.report_to: %s failed to log (%s: %s); retrying at each checkpoint",
                                tracker.name, type(error).__name__, error)
        if failed:
            return
        self.pending = [row for row in self.pending if row[0] > self.committed]
        self._write_state()

    def _write_state(self) -> None:
        if self.state_file is not None:
            state = {t.name: t.record() for t in self.remote}
            state["sent_through"] = self.committed
            atomic_write_text(self.state_file, json.dumps(state, indent=1) + "\n")

    def text(self, tag: str, text: str) -> None:
        """E.g. the resolved spec as a Markdown code block: TensorBoard text, MLflow/W&B files ``<tag>.md``."""
        if self.tensorboard is not None:
            self.tensorboard.text(tag, text)
        for tracker in self.remote:
            tracker.text(tag, text)

    def flush(self) -> None:
        """Write TensorBoard's buffered events (the other trackers are written at each commit)."""
        if self.tensorboard is not None:
            self.tensorboard.flush()

    def close(self) -> None:
        """Close every tracker; rows no checkpoint covers are dropped (a resume logs them again)."""
        if self._hook is not None:
            self._hook[0].commit_hooks.remove(self._hook[1])
            self._hook = None
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        for tracker in self.remote:
            tracker.close()
        self.remote = []

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_state(output_dir: str | Path) -> dict:
    """``trackers.json`` of a run folder ({} when absent or unreadable: new tracker runs then)."""
    path = Path(output_dir) / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def open_trackers(spec: RunSpec, output_dir: str | Path, *, enabled: bool, resume_step: int = 0,
                  checkpoints: CheckpointManager | None = None, step_offset: int = 0) -> Trackers:
    """The run's logger: every tracker of ``spec.logging.report_to`` on the rank with ``enabled``.

    Collective (every rank calls it): a tracker that cannot start is one ``SpecError`` on every rank.
    ``resume_step`` is the (run) step this launch continues from; ``checkpoints`` (whose step +
    ``step_offset`` is the run step) tells when rows may go to MLflow/W&B.
    """
    error, trackers = None, Trackers(None, [], None)
    if enabled:
        try:
            trackers = _open(spec, Path(output_dir), resume_step)
        except SpecError as problem:
            error = str(problem)
    error = from_rank0(error)
    if error is not None:
        trackers.close()
        raise SpecError(error)
    if (trackers.remote or trackers.tensorboard is not None) and checkpoints is not None:
        hook = lambda step: trackers.commit(step + step_offset)
        checkpoints.commit_hooks.append(hook)
        trackers._hook = (checkpoints, hook)
    return trackers


def _open(spec: RunSpec, output_dir: Path, resume_step: int) -> Trackers:

    names = spec.logging.report_to
    state = read_state(output_dir)
    sent = int(state.get("sent_through", 0) or 0)
    if resume_step == 0 and sent > 0:
        log.warning("%s: a run from step 0 in a folder whose trackers got steps up to %d; opening new "
                    "MLflow/W&B runs", output_dir / STATE_FILE, sent)
        state, sent = {}, 0
    elif resume_step < sent:
        log.warning("resuming at step %d; MLflow/W&B already hold steps up to %d and keep those values",
                    resume_step, sent)
    remote: list[Tracker] = []
    try:
        for name, cls in (("mlflow", MlflowTracker), ("wandb", WandbTracker)):
            if name in names:
                remote.append(cls(spec, output_dir, state.get(name)))
    except SpecError:
        for tracker in remote:
            tracker.close()
        raise
    tensorboard = None
    if "tensorboard" in names:
        tensorboard = TensorBoardLogger(spec.logging.tensorboard_dir or output_dir / "tensorboard",
                                        enabled=True, purge_step=resume_step + 1)
    trackers = Trackers(tensorboard, remote, output_dir / STATE_FILE if remote else None,
                        committed=max(resume_step, sent), floor=sent)
    if remote:
        trackers._write_state()
    return trackers
