"""MLflow as a tracker: one MLflow run per training run, continued (same run id) by every resume.

The run is opened with ``MlflowClient`` (no global ``mlflow.start_run`` state, so nothing leaks into
other code of the process). A new run receives the resolved spec twice: flattened into params
(``losses.weights.ss`` = ``1.0``, to compare runs in MLflow's table) and whole as the artifact
``spec.json``; text summaries (the spec and plan blocks TensorBoard shows) become artifacts
``<tag>.md``. Metrics go out in ``log_batch`` calls (one SQL transaction on a SQLite store).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mlkd_scale.spec import RunSpec, SpecError

MAX_PARAM_CHARS = 6000  # MLflow 3's limit on a param value
_KEY_BAD = re.compile(r"[^\w\-. /:]")


def default_uri(output_dir: Path) -> str:
    """``sqlite:///<output_dir>/mlflow/mlflow.db``: a local store that needs no server."""
    return "sqlite:///" + str((output_dir / "mlflow" / "mlflow.db").resolve())


def flat_params(tree: dict, prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": "1"}``, keys cleaned to MLflow's alphabet, values cut to its limit."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = _KEY_BAD.sub("_", f"{prefix}{key}")
        if isinstance(value, dict) and value:
            out.update(flat_params(value, name + "."))
        else:
            text = str(value)
            out[name] = text if len(text) <= MAX_PARAM_CHARS else text[: MAX_PARAM_CHARS - 1] + "…"
    return out


@contextmanager
def _fail_fast() -> Iterator[None]:
    """While opening: an unreachable server fails in seconds, not after MLflow's minutes of retries
    (unless the user set these variables)."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)


class MlflowTracker:
    """An open MLflow run; ``recorded`` is this tracker's entry of ``trackers.json`` (or None)."""

    name = "mlflow"

    def __init__(self, spec: RunSpec, output_dir: Path, recorded: dict | None):
        settings = spec.logging.mlflow
        self.uri = settings.tracking_uri or default_uri(output_dir)
        try:
            from mlflow.entities import Metric, Param
            from mlflow.tracking import MlflowClient
        except ImportError as error:
            raise SpecError(
                f"logging.report_to names mlflow, but MLflow is not installed ({error}); "
                "pip install 'mlkd-scale[mlflow]' or remove mlflow from logging.report_to"
            ) from None
        self._metric, self._param = Metric, Param
        if not settings.tracking_uri:
            (output_dir / "mlflow").mkdir(parents=True, exist_ok=True)
        try:
            with _fail_fast():
                self.client = MlflowClient(tracking_uri=self.uri)
                self.run_id, self.resumed = self._open(spec, output_dir, recorded)
        except SpecError:
            raise
        except Exception as error:  # noqa: BLE001 - MLflow raises many types (MlflowException, OSError, SQL)
            where = "logging.mlflow.tracking_uri" if settings.tracking_uri else "the default tracking URI"
            raise SpecError(
                f"{where} {self.uri!r}: MLflow could not open a run ({type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else ''}); fix the URI (e.g. sqlite:///abs/path.db, "
                "http://host:5000) or remove mlflow from logging.report_to"
            ) from None

    def _open(self, spec: RunSpec, output_dir: Path, recorded: dict | None) -> tuple[str, bool]:
        """The recorded run when it is in this store (set back to RUNNING), else a new one with params."""
        client = self.client
        if recorded and recorded.get("tracking_uri") == self.uri and recorded.get("run_id"):
            try:
                found = client.get_run(recorded["run_id"]).info.lifecycle_stage == "active"
            except Exception:  # noqa: BLE001 - not in this store (deleted, or a store recreated since)
                found = False
            if found:
                client.update_run(recorded["run_id"], status="RUNNING")
                return recorded["run_id"], True
        name = spec.logging.mlflow.experiment or spec.run.name
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            artifacts = None if spec.logging.mlflow.tracking_uri else (output_dir / "mlflow" / "artifacts").resolve()
            experiment_id = client.create_experiment(name, artifact_location=artifacts.as_uri() if artifacts else None)
        run = client.create_run(experiment_id, run_name=spec.run.name, tags={"mlkd_scale.output_dir": str(output_dir)})
        params = [self._param(k, v) for k, v in flat_params(spec.model_dump(mode="json")).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            client.log_batch(run.info.run_id, params=params[i : i + 100])
        client.log_dict(run.info.run_id, spec.model_dump(mode="json"), "spec.json")
        return run.info.run_id, False

    def record(self) -> dict:
        """What ``trackers.json`` keeps to find this run again."""
        run = self.client.get_run(self.run_id)
        return {"tracking_uri": self.uri, "experiment_id": run.info.experiment_id, "run_id": self.run_id}

    def log(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        """Every (step, scalars) row as MLflow metrics of that step."""
        now = int(time.time() * 1000)
        metrics = [self._metric(k, v, now, step) for step, scalars in rows for k, v in scalars.items()]
        for i in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics per batch
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def text(self, tag: str, text: str) -> None:
        """``text`` as the artifact ``<tag>.md`` (rewritten by a resume)."""
        self.client.log_text(self.run_id, text, f"{tag}.md")

    def close(self) -> None:
        """Mark the run FINISHED (a resume sets it RUNNING again)."""
        self.client.set_terminated(self.run_id, status="FINISHED")


def read_metrics(tracking_uri: str, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """Every metric of the run: key -> [(step, value), ...] in step order (for tests and checks)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    keys = client.get_run(run_id).data.metrics
    return {
        key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key)) for key in sorted(keys)
    }
