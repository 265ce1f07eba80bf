"""logging.report_to: TensorBoard, MLflow (local SQLite store) and W&B (offline) behind one logger.

In process, with the real MLflow and W&B packages: rows reach MLflow/W&B only once a checkpoint
commit covers their step, a "crashed" launch and its resume leave every step there once, with
TensorBoard's values; a tracker that cannot start is one SpecError. Read back with MlflowClient and
with W&B's own reader (``wandb leet inspect --json``). The launcher test is in test_trackers_launcher.py.
"""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from run_fixtures import make_spec

from mlkd_scale.engine.trackers import STATE_FILE, open_trackers, read_scalars, read_texts
from mlkd_scale.engine.trackers.mlflow_tracker import default_uri, flat_params, read_metrics
from mlkd_scale.engine.trackers.wandb_tracker import offline_files, read_config, read_history
from mlkd_scale.launch import launch
from mlkd_scale.spec import RunSpec, SpecError

pytest.importorskip("mlflow")
pytest.importorskip("wandb")


def _spec(out: Path, **logging) -> RunSpec:
    return RunSpec.model_validate({
        "run": {"name": "trk", "output_dir": str(out)},
        "teacher": {"path": "unused"},
        "data": {"sources": [{"path": "unused.jsonl"}]},
        "train": {"max_steps": 8},
        "logging": {"report_to": ["tensorboard", "mlflow", "wandb"], **logging},
    })


def _same(got: list[tuple[int, float]], want: list[tuple[int, float]]) -> None:
    assert [s for s, _ in got] == [s for s, _ in want]
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)


def _launch(spec, out, resume_step, steps, commits, eval_after=()):
    """One launch: log ``steps`` (loss = step / 10), commit checkpoints at ``commits`` (the hook
    CheckpointManager calls), log an eval row right after each commit in ``eval_after``; then close."""
    ckpt = SimpleNamespace(commit_hooks=[])
    logger = open_trackers(spec, out, enabled=True, resume_step=resume_step, checkpoints=ckpt)
    logger.text("spec", "```json\n" + spec.model_dump_json(indent=2) + "\n```")
    for step in steps:
        logger.scalars(step, {"loss/total": step / 10, "lr": 1e-3 * step})
        if step in commits:
            for hook in ckpt.commit_hooks:
                hook(step)
        if step in eval_after:
            logger.scalars(step, {"eval/loss": step / 100})
    logger.close()
    assert ckpt.commit_hooks == [], "close() leaves no hook behind"


def test_a_crashed_launch_and_its_resume_log_every_step_once(tmp_path):
    out = tmp_path / "out"
    spec = _spec(out)
    # launch 1 checkpoints at 3 and dies after logging steps 4 and 5 (close drops uncovered rows)
    _launch(spec, out, 0, steps=[1, 2, 3, 4, 5], commits={3})
    first = json.loads((out / STATE_FILE).read_text())
    assert first["sent_through"] == 3
    uri = default_uri(out)
    assert sorted(read_metrics(uri, first["mlflow"]["run_id"])["loss/total"]) == [(s, s / 10) for s in (1, 2, 3)]
    # launch 2 resumes from checkpoint 3: steps 4..8, checkpoints 6 and 8, a dev evaluation after 6
    _launch(spec, out, 3, steps=[4, 5, 6, 7, 8], commits={6, 8}, eval_after={6})
    state = json.loads((out / STATE_FILE).read_text())
    assert state["mlflow"]["run_id"] == first["mlflow"]["run_id"] and state["wandb"]["id"] == first["wandb"]["id"]
    assert state["sent_through"] == 8

    tensorboard = read_scalars(out / "tensorboard")
    mlflow = read_metrics(uri, state["mlflow"]["run_id"])
    wandb = read_history(out, state["wandb"]["id"])
    assert len(offline_files(out, state["wandb"]["id"])) == 2  # one offline folder per launch, one id
    for tag in ("loss/total", "lr", "eval/loss"):
        _same(tensorboard[tag], mlflow[tag])  # TensorBoard keeps float32
        _same(sorted(wandb[tag]), mlflow[tag])
    assert [s for s, _ in mlflow["loss/total"]] == list(range(1, 9))
    assert [s for s, _ in wandb["loss/total"]] == list(range(1, 9))  # in order, none twice
    assert mlflow["eval/loss"] == [(6, pytest.approx(0.06))]

    # the resolved spec: MLflow params + spec.json, W&B config, TensorBoard text
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    run = client.get_run(state["mlflow"]["run_id"])
    assert run.data.params["train.max_steps"] == "8" and run.info.status == "FINISHED"
    assert client.list_artifacts(run.info.run_id)  # spec.json, spec.md
    assert read_config(out, state["wandb"]["id"])["train"]["max_steps"] == 8
    assert '"max_steps": 8' in read_texts(out / "tensorboard")["spec/text_summary"][0]


def test_a_restart_from_step_0_opens_new_runs_and_an_older_resume_logs_nothing_twice(tmp_path):
    out = tmp_path / "out"
    spec = _spec(out, report_to=["mlflow"])
    _launch(spec, out, 0, steps=[1, 2], commits={2})
    first = json.loads((out / STATE_FILE).read_text())["mlflow"]["run_id"]
    _launch(spec, out, 0, steps=[1, 2], commits={2})
    second = json.loads((out / STATE_FILE).read_text())["mlflow"]["run_id"]
    assert first != second
    assert not (out / "tensorboard").exists(), "tensorboard is not in report_to"
    assert [s for s, _ in read_metrics(default_uri(out), second)["loss/total"]] == [1, 2]
    # a resume from an older checkpoint (1) trains 2 again: MLflow keeps its step 2, gets step 3 once
    ckpt = SimpleNamespace(commit_hooks=[])
    with open_trackers(spec, out, enabled=True, resume_step=1, checkpoints=ckpt) as logger:
        for step in (2, 3):
            logger.scalars(step, {"loss/total": 1.0})
        ckpt.commit_hooks[0](3)
    assert read_metrics(default_uri(out), second)["loss/total"] == [(1, 0.1), (2, 0.2), (3, 1.0)]


def test_a_tracker_that_cannot_start_is_one_spec_error(tmp_path, monkeypatch):
    out = tmp_path / "out"
    bad = _spec(out, report_to=["mlflow"], mlflow={"tracking_uri": "bogus://nowhere"})
    with pytest.raises(SpecError, match=r"logging.mlflow.tracking_uri 'bogus://nowhere': MLflow could not open"):
        open_trackers(bad, out, enabled=True)
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if the extra were not installed
    with pytest.raises(SpecError, match=r"logging.report_to names wandb, but W&B is not installed.*mlkd-scale\[wandb\]"):
        open_trackers(_spec(out, report_to=["wandb"]), out, enabled=True)
    disabled = open_trackers(bad, out, enabled=False)  # other ranks open nothing
    disabled.scalars(1, {"x": 1.0})
    disabled.close()


def test_a_bad_tracking_uri_ends_a_launch_with_status_2_and_one_message(tmp_path, assets, monkeypatch, capsys):
    """What every launcher does (mlkd_scale.launch.launch), with the engine's first tracker step as the run."""
    spec = make_spec(tmp_path, *assets, logging__report_to=["tensorboard", "mlflow"])
    monkeypatch.setattr(sys, "argv", ["general_kd.py", "--spec", str(spec),
                                      "--set", "logging.mlflow.tracking_uri=bogus://nowhere"])
    opened = []

    def run(spec, stop_after_steps=None):
        opened.append(open_trackers(spec, spec.run.output_dir, enabled=True))

    assert launch(run, "test", "stop") == 2
    err = capsys.readouterr().err
    assert "logging.mlflow.tracking_uri 'bogus://nowhere': MLflow could not open a run" in err
    assert "Traceback" not in err and not opened


def test_flat_params_cleans_keys_and_cuts_long_values():
    params = flat_params({"a": {"b c": 1, "w[0]": "x" * 7000}, "empty": {}})
    assert params["a.b c"] == "1" and params["empty"] == "{}"
    assert len(params["a.w_0_"]) == 6000


def test_importing_deepspeed_does_not_load_mlflow():
    """DeepSpeed's autotuner imports mlflow when installed (~3 s); mlkd_scale defers it."""
    code = ("import sys, mlkd_scale, deepspeed; m = sys.modules['mlflow']; assert type(m).__name__ == "
            "'_DeferredModule', type(m); from mlflow.tracking import MlflowClient; import mlflow; "
            "assert type(sys.modules['mlflow']).__name__ == 'module'; print(mlflow.__version__)")
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
