"""Weights & Biases as a tracker: one W&B run id per training run, offline by default.

The resolved spec is the run's config; text summaries (the spec and plan blocks TensorBoard shows)
are files ``<tag>.md`` of the run. Every row is logged as its own committed W&B history row that
carries the training step as the metric ``step``, which every other metric uses as its x axis
(``define_metric``): rows of one step logged at different times (training scalars, then a dev
evaluation) never collide with W&B's own ``_step`` counter, which must only grow.

Offline, each launch writes its own folder ``wandb/offline-run-<time>-<id>/run-<id>.wandb`` under
the same run id (W&B cannot append to an offline run: wandb/wandb#4624); together they hold every
step once. W&B's service buffers the ``.wandb`` file for 15 s by default, so a killed process
would lose what it logged last; :data:`FLUSH_INTERVAL_S` makes that window half a second.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

from mlkd_scale.spec import RunSpec, SpecError

FLUSH_INTERVAL_S = 0.5  # wandb's x_transaction_log_flush_interval (default 15 s)
STEP_KEY = "step"


class WandbTracker:
    """An open W&B run; ``recorded`` is this tracker's entry of ``trackers.json`` (or None)."""

    name = "wandb"

    def __init__(self, spec: RunSpec, output_dir: Path, recorded: dict | None):
        settings = spec.logging.wandb
        try:
            import wandb
        except ImportError as error:
            raise SpecError(
                f"logging.report_to names wandb, but W&B is not installed ({error}); "
                "pip install 'mlkd-scale[wandb]' or remove wandb from logging.report_to"
            ) from None
        self.dir = Path(settings.dir or output_dir)
        self.run_id = (recorded or {}).get("id") or secrets.token_hex(4)
        self.resumed = bool(recorded)
        # A wandb-core service inherited through WANDB_SERVICE (from a notebook or a test session that
        # ran W&B) outlives a killed launch and keeps its run id "in use", so the resume could not reopen
        # the run: every launch starts a service of its own, which dies with it.
        os.environ.pop("WANDB_SERVICE", None)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.run = wandb.init(
                project=settings.project,
                entity=settings.entity,
                name=spec.run.name,
                id=self.run_id,
                resume="allow",
                mode=settings.mode,
                dir=str(self.dir),
                config=spec.model_dump(mode="json"),
                settings=wandb.Settings(
                    silent=True, console="off", x_disable_stats=True,
                    x_transaction_log_flush_interval=FLUSH_INTERVAL_S,
                ),
            )
            self.run.define_metric(STEP_KEY)
            self.run.define_metric("*", step_metric=STEP_KEY)
        except Exception as error:  # noqa: BLE001 - wandb raises its own errors, OSError, ...
            raise SpecError(
                f"logging.wandb (project {settings.project!r}, mode {settings.mode}, dir {str(self.dir)!r}): "
                f"W&B could not start a run ({type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}); "
                "fix logging.wandb (an online run needs `wandb login`) or remove wandb from logging.report_to"
            ) from None

    def record(self) -> dict:
        """What ``trackers.json`` keeps to continue this run."""
        return {"id": self.run_id, "project": self.run.project, "dir": str(self.dir.resolve())}

    def log(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        """Each (step, scalars) row as one committed history row with ``step`` = the training step."""
        for step, scalars in rows:
            self.run.log({**scalars, STEP_KEY: step})

    def text(self, tag: str, text: str) -> None:
        """``text`` as the run file ``<tag>.md`` (uploaded with the run by ``wandb sync``)."""
        path = Path(self.run.dir) / f"{tag}.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    def close(self) -> None:
        """Finish the run (its ``.wandb`` file is complete afterwards)."""
        self.run.finish()


def offline_files(root: str | Path, run_id: str) -> list[Path]:
    """The offline transaction logs of ``run_id`` under ``root`` (a ``wandb`` folder's parent), oldest first."""
    return sorted(Path(root).glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"))


def read_records(path: str | Path) -> list[dict]:
    """The records of a ``.wandb`` file, read by W&B's own reader (``wandb leet inspect --json``)."""
    proc = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(path)],
        capture_output=True, text=True, timeout=120, check=True,
    )
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def read_history(root: str | Path, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """Every metric W&B recorded offline for ``run_id``, over all its launches: key -> [(step, value)]
    in the order logged, ``step`` being the training step (for tests and checks)."""
    out: dict[str, list[tuple[int, float]]] = {}
    for path in offline_files(root, run_id):
        for record in read_records(path):
            if record.get("type") != "history":
                continue
            item = record["history"]["item"]
            for key, value in item.items():
                if not key.startswith("_") and key != STEP_KEY:
                    out.setdefault(key, []).append((item[STEP_KEY], value))
    return out


def read_config(root: str | Path, run_id: str) -> dict:
    """The config of ``run_id``'s first offline launch (the resolved spec, plus W&B's ``_wandb``)."""
    for record in read_records(offline_files(root, run_id)[0]):
        if record.get("type") == "run":
            return record["run"]["config"]["update"]
    return {}
