"""``logging.report_to`` and the settings of the optional experiment trackers (MLflow, W&B).

Kept apart from :mod:`mlkd_scale.spec.sections` so that the logging section stays small; the
engine side is :mod:`mlkd_scale.engine.trackers`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from mlkd_scale.spec.fields import StrictModel

TrackerName = Literal["tensorboard", "mlflow", "wandb"]


class MlflowSpec(StrictModel):
    """Where MLflow records the run (used when logging.report_to names mlflow)."""

    tracking_uri: str = Field(
        "",
        description="MLflow tracking URI (sqlite:///path.db, file:/path, http://host:5000, databricks); "
        "empty = sqlite:///<run.output_dir>/mlflow/mlflow.db with artifacts under <run.output_dir>/mlflow/.",
    )
    experiment: str = Field("", description="MLflow experiment name; empty = run.name.")


class WandbSpec(StrictModel):
    """Where Weights & Biases records the run (used when logging.report_to names wandb)."""

    project: str = Field("mlkd_scale", min_length=1, description="W&B project.")
    entity: str | None = Field(None, description="W&B entity (user or team); None = the account's default.")
    mode: Literal["offline", "online"] = Field(
        "offline",
        description="offline: write <dir>/wandb/offline-run-*/run-<id>.wandb only (upload later with "
        "`wandb sync`); online: stream to the W&B server (needs `wandb login`).",
    )
    dir: str = Field("", description="Folder that receives W&B's wandb/ folder; empty = run.output_dir.")


def check_report_to(value: list[str]) -> list[str]:
    """Each tracker at most once: a duplicate would log every scalar twice to the same run."""
    seen = [name for i, name in enumerate(value) if name in value[:i]]
    if seen:
        raise ValueError(f"names {sorted(set(seen))} more than once; list each tracker once")
    return value


class TrackersMixin(StrictModel):
    """The tracker fields of the logging section."""

    report_to: list[TrackerName] = Field(
        default_factory=lambda: ["tensorboard"],
        description="Experiment trackers that receive every scalar and the resolved spec, on rank 0: "
        "tensorboard (events under logging.tensorboard_dir), mlflow (pip install 'mlkd-scale[mlflow]'; "
        "logging.mlflow), wandb (pip install 'mlkd-scale[wandb]'; logging.wandb). A resumed run continues "
        "the same MLflow/W&B runs (ids in <run.output_dir>/trackers.json) and each step reaches them once: "
        "rows are sent when a checkpoint covers their step. A tracker that cannot start stops the run "
        "before training. [] logs nowhere.",
    )
    mlflow: MlflowSpec = Field(default_factory=MlflowSpec, description="MLflow settings.")
    wandb: WandbSpec = Field(default_factory=WandbSpec, description="W&B settings.")

    @field_validator("report_to")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        return check_report_to(value)
