"""logging.report_to [tensorboard, mlflow, wandb] through the real launcher, killed and resumed.

Rank 0 (the one that logs) is SIGKILLed after step 5 of 8 (checkpoints every 3 steps); the relaunch
resumes from checkpoint 3. Afterwards there is one MLflow run and one W&B run id, and each holds
every step once with TensorBoard's values. (A bad tracking URI's exit status 2 is tested through
``mlkd_scale.launch.launch`` in tests/test_trackers.py.)
"""

import json

import pytest
from run_fixtures import check_ok, make_spec, run_launcher, start_launcher

from mlkd_scale.engine.checkpoints.files import tag_for
from mlkd_scale.engine.trackers import STATE_FILE, read_scalars
from mlkd_scale.engine.trackers.mlflow_tracker import default_uri, read_metrics
from mlkd_scale.engine.trackers.wandb_tracker import offline_files, read_history

pytest.importorskip("mlflow")
pytest.importorskip("wandb")
pytestmark = pytest.mark.launcher


def _equal_rows(got: list[tuple[int, float]], want: list[tuple[int, float]], tag: str) -> None:
    assert [s for s, _ in got] == [s for s, _ in want], tag
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6), tag  # TensorBoard: float32


def test_killed_and_resumed_run_continues_the_same_tracker_runs(tmp_path, assets):
    spec = make_spec(tmp_path, *assets, train__max_steps=8, checkpoint__every_n_steps=3, checkpoint__keep_last=3,
                     logging__report_to=["tensorboard", "mlflow", "wandb"])
    out = tmp_path / "out"

    marker = tmp_path / "killed_at"
    faults = {"kill_at_step": {"rank": 0, "step": 5}, "kill_marker": str(marker), "step_sleep_s": 1.0}  # > W&B's 0.5 s flush
    proc = start_launcher(spec, faults=faults, log=tmp_path / "killed.log")
    assert proc.wait(timeout=600) != 0 and marker.exists(), (tmp_path / "killed.log").read_text()[-3000:]
    assert (out / "checkpoints" / "latest").read_text().strip() == tag_for(3)
    first = json.loads((out / STATE_FILE).read_text())
    assert first["sent_through"] == 3
    uri = default_uri(out)
    assert [s for s, _ in read_metrics(uri, first["mlflow"]["run_id"])["loss/total"]] == [1, 2, 3]

    resumed = check_ok(run_launcher(spec))
    assert f"resumed from {out / 'checkpoints' / tag_for(3)} at step 3" in resumed.stdout
    state = json.loads((out / STATE_FILE).read_text())
    assert state["mlflow"] == first["mlflow"] and state["wandb"]["id"] == first["wandb"]["id"]
    assert state["sent_through"] == 8

    from mlflow.tracking import MlflowClient

    runs = MlflowClient(uri).search_runs([state["mlflow"]["experiment_id"]])
    assert [r.info.run_id for r in runs] == [state["mlflow"]["run_id"]], "one MLflow run"
    assert len(offline_files(out, state["wandb"]["id"])) == 2, "one W&B run id, an offline folder per launch"

    tensorboard = read_scalars(out / "tensorboard")
    mlflow = read_metrics(uri, state["mlflow"]["run_id"])
    wandb = read_history(out, state["wandb"]["id"])
    assert set(mlflow) == set(wandb) == set(tensorboard)
    assert [s for s, _ in tensorboard["loss/total"]] == list(range(1, 9))
    for tag, rows in tensorboard.items():
        _equal_rows(mlflow[tag], rows, tag)
        _equal_rows(wandb[tag], rows, tag)  # in the order logged: every step once, none lost
