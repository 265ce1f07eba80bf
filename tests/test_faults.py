"""Preemption, crashes and non-finite numbers through the real deepspeed launcher on 2 CPU ranks.

Faults are injected from the test side (tests/fault_injection/sitecustomize.py, via
run_fixtures.start_launcher): signals, SIGKILL in training and in every write of a checkpoint,
a lost "node" (two ``--no_ssh`` launchers), a resume on another world size, a task run. Every
scenario ends with a relaunch that finishes the run, and the documents trained on
(logging.record_sample_ids) are compared with an uninterrupted run's (a task run: its results,
curves and weights).
"""

import json
import math
import signal
import sys
import time
from pathlib import Path

import deepspeed
import psutil
import pytest
import torch
from run_fixtures import (
    check_ok,
    make_spec,
    per_shard,
    sample_ids,
    start_launcher,
    start_two_nodes,
    state_fingerprint,
    uninterrupted_ids,
    uninterrupted_per_shard,
)
from task_fixtures import make_task_teacher, run_task_launcher, task_spec

from mlkd_scale.engine.checkpoints.manager import is_complete, read_complete, tag_for
from mlkd_scale.engine.checkpoints.reshard import UNIVERSAL
from mlkd_scale.engine.faults import (
    EXIT_GRACE_EXPIRED,
    EXIT_NONFINITE,
    EXIT_PEER_LOST,
    EXIT_PREEMPTED,
    ensure_nonfinite_skipping,
    poison_nonfinite,
)
from mlkd_scale.engine.task.stage import full_state_dict
from mlkd_scale.engine.trackers import read_scalars

sys.path.insert(0, str(Path(__file__).parent / "ds_scripts"))
import ckpt_helpers as h

launcher = pytest.mark.launcher

STEPS = 12
SPEC = {"train__max_steps": STEPS, "checkpoint__every_n_steps": 3, "checkpoint__keep_last": 10}


@pytest.mark.parametrize("stage,bf16", [(0, False), (1, False), (2, False), (3, False), (0, True), (2, True)])
@pytest.mark.parametrize("fault", ["times_nan", "plus_inf"])
def test_a_nonfinite_loss_skips_the_step(stage, bf16, fault):
    """On every ZeRO stage and precision the engine skips a step whose loss is NaN or inf: weights,
    optimizer state and lr unchanged, ``skipped_steps`` counts it. ``loss + inf`` has the gradients of
    ``loss`` (finite); only the poisoning makes that step skip."""
    h.init_single_process()
    engine = h.make_engine(stage, seed=0, bf16=bf16)
    ensure_nonfinite_skipping(engine)
    h.train_step(engine, h.batch(0))  # the optimizer has state now
    weights, state, lr = h.full_state(engine), state_fingerprint(engine)["optimizer"], engine.get_lr()
    loss = engine(h.batch(1))
    loss = loss * math.nan if fault == "times_nan" else loss + math.inf
    engine.backward(poison_nonfinite(loss))
    engine.step()
    assert not engine.was_step_applied() and engine.skipped_steps == 1
    after = h.full_state(engine)
    assert all(torch.equal(after[k], weights[k]) for k in weights)
    assert state_fingerprint(engine)["optimizer"] == state and engine.get_lr() == lr
    h.train_step(engine, h.batch(2))
    assert engine.was_step_applied() and engine.skipped_steps == 1
    assert not torch.equal(h.full_state(engine)["student.embeddings.word_embeddings.weight"],
                           weights["student.embeddings.word_embeddings.weight"])


def test_poisoning_keeps_a_finite_loss_exact():
    x = torch.randn(5, requires_grad=True)
    loss = (x**2).sum()
    poisoned = poison_nonfinite(loss)
    assert torch.equal(poisoned, loss)
    (grad,) = torch.autograd.grad(poisoned, x)
    assert torch.equal(grad, 2 * x.detach())


@pytest.fixture(scope="module")
def reference_ids(assets, tmp_path_factory):
    """The documents an uninterrupted run trains on (each rank's stream drawn in this process;
    test_general_kd checks that a launched run trains on exactly these)."""
    ids = uninterrupted_ids(make_spec(tmp_path_factory.mktemp("reference"), *assets, **SPEC))
    assert len(ids) == len(set(ids)) > 50
    return ids


def _spec(tmp_path, assets, **extra):
    return make_spec(tmp_path, *assets, **{**SPEC, **extra})


def _latest(out) -> str:
    return (out / "checkpoints" / "latest").read_text().strip()


def _start(spec, phase: str, faults=None, **kwargs):
    """start_launcher with its output in ``<spec dir>/<phase>.log`` (read back with :func:`_log`)."""
    return start_launcher(spec, faults=faults, log=spec.parent / f"{phase}.log", **kwargs)


def _log(tmp_path, phase: str) -> str:
    return (tmp_path / f"{phase}.log").read_text()


def _started_step(out) -> int:
    """The optimizer step rank 0 is in (from its sample-id log; 0 before the first batch)."""
    path = out / "sample_ids" / "rank00000.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return json.loads(lines[-1])["step"] if lines else 0


def _wait_for_step(proc, out, step: int, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while _started_step(out) < step:
        assert proc.poll() is None, f"the run ended (status {proc.returncode}) before step {step}"
        assert time.monotonic() < end, f"step {step} not reached in {timeout} s"
        time.sleep(0.2)


def _ranks(proc) -> list[psutil.Process]:
    ranks = [p for p in psutil.Process(proc.pid).children(recursive=True) if "--local_rank" in " ".join(p.cmdline())]
    assert len(ranks) == 2, ranks
    return sorted(ranks, key=lambda p: next(a for a in p.cmdline() if a.startswith("--local_rank")))


def _finish(tmp_path, spec, reference_ids, resumed_from: str, ranks: int = 2) -> None:
    """Relaunch without faults: it resumes from ``resumed_from`` and trains exactly the documents of
    an uninterrupted run, none lost, none twice; every step is logged once."""
    proc = _start(spec, "final", ranks=ranks)
    assert proc.wait(timeout=600) == 0, _log(tmp_path, "final")[-3000:]
    assert f"resumed from {tmp_path / 'out' / 'checkpoints' / resumed_from} " in _log(tmp_path, "final")
    ids = sample_ids(tmp_path / "out")
    assert len(ids) == len(set(ids)), "a document was trained on twice"
    assert sorted(ids) == sorted(reference_ids), "documents were lost or added by the interruptions"
    logged = [s for s, _ in read_scalars(tmp_path / "out" / "tensorboard")["loss/total"]]
    assert logged == list(range(1, STEPS + 1)), "TensorBoard kept steps of a crashed launch"


def _exits_promptly(proc, marker: Path, timeout: float = 600) -> int:
    """``proc``'s exit status, after asserting that it ended within 30 s of the kill ``marker``."""
    status = proc.wait(timeout=timeout)
    assert time.time() - float(marker.read_text()) < 30, "the other rank did not exit promptly"
    return status


@launcher
def test_preemption(tmp_path, assets, reference_ids):
    """SIGTERM to the deepspeed command, then to every rank (as Slurm does), then SIGUSR1 to every
    rank, then a checkpoint that outlives the grace period; then a relaunch finishes the run."""
    grace = 8
    spec = _spec(tmp_path, assets, faults__preemption_grace_s=grace)
    out = tmp_path / "out"

    # 1. SIGTERM to the `deepspeed` runner: it dies at once without telling launch.py; the ranks
    # notice, agree on a step, checkpoint and exit.
    proc = _start(spec, "runner_sigterm", {"step_sleep_s": 1.0})
    _wait_for_step(proc, out, 3)
    ranks = _ranks(proc)
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    _, alive = psutil.wait_procs(ranks, timeout=grace + 15)
    assert not alive, "ranks still running after the grace period"
    assert time.monotonic() - signalled < grace + 15
    first = _latest(out)
    stopped_at = int(first[4:])
    assert 3 <= stopped_at < STEPS - 4 and is_complete(out / "checkpoints" / first)
    assert f"checkpoint {first} written" in _log(tmp_path, "runner_sigterm")

    # 2. SIGTERM to every rank directly: exit status 75 through launch.py and the runner.
    proc = _start(spec, "ranks_sigterm", {"step_sleep_s": 1.0})
    _wait_for_step(proc, out, stopped_at + 1)
    signalled = time.monotonic()
    for rank in _ranks(proc):
        rank.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=grace + 30) == EXIT_PREEMPTED, _log(tmp_path, "ranks_sigterm")[-3000:]
    assert time.monotonic() - signalled < grace + 15
    second = _latest(out)
    assert stopped_at < int(second[4:]) < STEPS - 1 and is_complete(out / "checkpoints" / second)

    # 3. SIGUSR1 to every rank: the same stop as SIGTERM.
    proc = _start(spec, "ranks_sigusr1", {"step_sleep_s": 1.0})
    _wait_for_step(proc, out, int(second[4:]) + 1)
    signalled = time.monotonic()
    for rank in _ranks(proc):
        rank.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=grace + 30) == EXIT_PREEMPTED, _log(tmp_path, "ranks_sigusr1")[-3000:]
    assert time.monotonic() - signalled < grace + 15
    third = _latest(out)
    assert int(second[4:]) < int(third[4:]) < STEPS - 1 and is_complete(out / "checkpoints" / third)
    log = _log(tmp_path, "ranks_sigusr1")
    assert "rank 0: received SIGUSR1" in log and "rank 1: received SIGUSR1" in log
    assert f"checkpoint {third} written; relaunch to continue (exit status 75)" in log

    # 4. SIGTERM to rank 0 only, with rank 1's checkpoint write slower than the grace period: both
    # exit with 76 at the deadline and `latest` keeps the previous checkpoint.
    proc = _start(spec, "grace_expired", {"step_sleep_s": 1.0, "slow_save_s": {"rank": 1, "seconds": 120}})
    _wait_for_step(proc, out, int(third[4:]) + 1)
    signalled = time.monotonic()
    _ranks(proc)[0].send_signal(signal.SIGTERM)
    assert proc.wait(timeout=grace + 60) == EXIT_GRACE_EXPIRED, _log(tmp_path, "grace_expired")[-3000:]
    assert time.monotonic() - signalled < grace + 15
    assert _latest(out) == third
    assert "grace period of 8 s" in _log(tmp_path, "grace_expired")

    _finish(tmp_path, spec, reference_ids, resumed_from=third)


def _optim_shards(tag_dir: Path, rank: int) -> list[Path]:
    """Rank ``rank``'s DeepSpeed optimizer shard of ``tag_dir``, and any temporary file of it."""
    return sorted(tag_dir.glob(f"*_rank_{rank}_*optim_states.pt*"))


@launcher
def test_rank_killed_in_training_and_in_every_write_of_a_checkpoint(tmp_path, assets, reference_ids):
    """SIGKILL of rank 1 after step 5, then (relaunched each time) in every write of checkpoint 6:
    rank 1's rank_state file, rank 1's DeepSpeed optimizer shard (left truncated), rank 0's COMPLETE
    (before its rename) and rank 0's `latest` (after COMPLETE is committed). Each time the other rank
    exits promptly and `latest` stays on checkpoint 3, a complete one; the relaunch resumes from it."""
    spec = _spec(tmp_path, assets)
    out = tmp_path / "out"
    six = out / "checkpoints" / tag_for(6)

    marker = tmp_path / "killed_at"
    proc = _start(spec, "kill_in_training", {"kill_at_step": {"rank": 1, "step": 5}, "kill_marker": str(marker)})
    assert _exits_promptly(proc, marker) != 0
    assert _latest(out) == tag_for(3)
    log = _log(tmp_path, "kill_in_training")
    assert "lost the other ranks" in log or "received SIGTERM" in log, log[-3000:]

    proc = _start(spec, "kill_in_save", {"kill_in_save": {"rank": 1, "step": 6}, "kill_marker": str(marker)})
    assert _exits_promptly(proc, marker) != 0
    assert _latest(out) == tag_for(3), "latest moved to a checkpoint a rank did not finish"
    assert six.is_dir() and not is_complete(six)
    (shard,) = _optim_shards(six, 1)
    full_size = shard.stat().st_size  # rank 1's shard was written whole before its rank_state

    # DeepSpeed's shard write: half of rank 1's optimizer shard on disk, then SIGKILL
    proc = _start(spec, "kill_in_shard",
                  {"kill_in_shard": {"rank": 1, "step": 6, "file": "optim_states"}, "kill_marker": str(marker)})
    assert _exits_promptly(proc, marker) != 0
    assert _latest(out) == tag_for(3) and not is_complete(six)
    (shard,) = _optim_shards(six, 1)
    assert 0 < shard.stat().st_size < full_size, "the shard was not left truncated"
    with pytest.raises(Exception):  # noqa: B017 (any error of a truncated pickle/zip)
        torch.load(shard, map_location="cpu", weights_only=False)
    assert not (six / "rank_state" / "rank00001.pt").exists()

    # rank 0 dies in the commit: every rank's files are on disk, COMPLETE is not
    proc = _start(spec, "kill_in_complete",
                  {"kill_in_commit": {"rank": 0, "step": 6, "file": "COMPLETE"}, "kill_marker": str(marker)})
    assert _exits_promptly(proc, marker) != 0
    assert _latest(out) == tag_for(3) and not is_complete(six)
    assert sorted(p.name for p in (six / "rank_state").iterdir()) == ["rank00000.pt", "rank00001.pt"]

    # ... and after COMPLETE, while writing `latest`: checkpoint 6 is complete, `latest` names 3
    proc = _start(spec, "kill_in_latest",
                  {"kill_in_commit": {"rank": 0, "step": 6, "file": "latest"}, "kill_marker": str(marker)})
    assert _exits_promptly(proc, marker) != 0
    assert is_complete(six) and _latest(out) == tag_for(3)
    committed = read_complete(six)["time"]

    # `latest` names the checkpoint to resume whenever it is complete (README: "relaunch to resume
    # from it"), so the relaunch goes back to 3, trains 4-6 again and writes checkpoint 6 anew.
    _finish(tmp_path, spec, reference_ids, resumed_from=tag_for(3))
    assert is_complete(six) and read_complete(six)["time"] > committed


@launcher
def test_a_lost_node_exits_4_then_the_run_resumes_on_one_rank(tmp_path, assets, reference_ids):
    """Two "nodes" (one rank each, a hostfile, ``--no_ssh``): SIGKILL of node 1's rank after step 5.
    No launcher of node 0 hears of it, so rank 0 finds out itself at its next collective and exits
    with status 4 and its message. The relaunch on ONE rank (accumulation doubled, the same global
    batch) resumes checkpoint 3 through a universal checkpoint: each stream shard feeds exactly the
    micro batches, in the same steps, of an uninterrupted 2-rank run."""
    spec = _spec(tmp_path, assets)
    out = tmp_path / "out"
    expected = uninterrupted_per_shard(spec)
    marker = tmp_path / "killed_at"
    nodes = start_two_nodes(spec, {"kill_at_step": {"rank": 1, "step": 5}, "kill_marker": str(marker)},
                            logs=(tmp_path / "node0.log", tmp_path / "node1.log"))
    try:
        status = _exits_promptly(nodes[0], marker)
        nodes[1].wait(timeout=60)
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    log = _log(tmp_path, "node0")
    assert status == EXIT_PEER_LOST, log[-3000:]
    assert "rank 0 lost the other ranks after step 5 (a rank died, or a collective ran past " in log, log[-3000:]
    assert f"`latest` names the last complete checkpoint ({tag_for(3)}); relaunch to resume from it" in log
    assert nodes[1].returncode != 0 and _latest(out) == tag_for(3)

    spec = _spec(tmp_path, assets, train__gradient_accumulation_steps=4)  # 1 rank: same global batch
    _finish(tmp_path, spec, reference_ids, resumed_from=tag_for(3), ranks=1)
    assert (out / "checkpoints" / tag_for(3) / UNIVERSAL).is_dir()
    assert read_complete(out / "checkpoints" / tag_for(STEPS))["world_size"] == 1
    got = per_shard(out)
    assert sorted(got) == [0, 1]
    for shard in (0, 1):
        assert got[shard] == expected[shard], f"shard {shard} fed other samples than an uninterrupted run"


def _wait_for_run_step(proc, steps_file: Path, step: int, timeout: float = 300) -> None:
    """Until rank 0 has reached run step ``step`` (``run_step_file`` of the fault injection)."""
    end = time.monotonic() + timeout
    while True:
        lines = steps_file.read_text().split() if steps_file.exists() else []
        if lines and int(lines[-1]) >= step:
            return
        assert proc.poll() is None, f"the run ended (status {proc.returncode}) before run step {step}"
        assert time.monotonic() < end, f"run step {step} not reached in {timeout} s"
        time.sleep(0.2)


def _task_outcome(out: Path) -> dict:
    """What an interrupted task run must share with an uninterrupted one: each stage's result.json
    (checkpoint paths by name, its epoch wall times left out), the exported student's dev report,
    the loss and dev curves, the kept checkpoints and the weights of each stage's final checkpoint."""

    def by_name(value):
        if isinstance(value, dict):
            return {k: Path(v).name if k == "checkpoint" else by_name(v) for k, v in value.items()}
        return value

    outcome = {"student": by_name(json.loads((out / "student" / "eval_results.json").read_text()))}
    scalars = read_scalars(out / "tensorboard")
    outcome["curves"] = {k: v for k, v in scalars.items() if k.startswith(("stage1/loss/", "stage2/loss/", "eval/"))}
    weights = {}
    for stage in ("stage1", "stage2"):
        result = by_name(json.loads((out / stage / "result.json").read_text()))
        result.pop("epoch_seconds")  # wall times: measured, so no two runs share them
        ckpt = out / stage / "checkpoints"
        outcome[stage] = {
            "result": result,
            "kept": sorted(p.name for p in ckpt.glob("step*")),
            "best": json.loads((ckpt / "best.json").read_text())["tag"],
        }
        weights[stage] = full_state_dict(ckpt / result["final"]["checkpoint"])
    return outcome, weights


@launcher
def test_task_run_preempted_then_a_rank_killed(tmp_path):
    """Task distillation (Stage 1, 4 steps, then Stage 2, 4 steps): SIGTERM to every rank in Stage 1
    (status 75, a checkpoint of that step), then SIGKILL of rank 1 at Stage-2 step 3; the relaunch
    resumes Stage 2's checkpoint 2 and ends exactly as an uninterrupted run: the same dev metrics,
    losses, results, kept checkpoints and final weights."""
    teacher = make_task_teacher(tmp_path / "teacher", "MRPC")
    budget = {"max_steps": 4, "lr": 1e-3}
    overrides = {"task__stage1": budget, "task__stage2": budget, "task__eval_every_n_steps": 2,
                 "checkpoint": {"every_n_steps": 2, "keep_last": 1}, "faults": {"preemption_grace_s": 15}}
    runs = {}
    for kind in ("straight", "faults"):
        (tmp_path / kind).mkdir()
        runs[kind] = task_spec(tmp_path / kind, teacher, "MRPC", **overrides)
    check_ok(run_task_launcher("task_kd.py", runs["straight"]))

    work, spec = tmp_path / "faults", runs["faults"]
    out = work / "out"
    steps = work / "run_steps"
    proc = _start(spec, "task_sigterm", {"run_step_sleep_s": 1.0, "run_step_file": str(steps)}, script="task_kd.py")
    _wait_for_run_step(proc, steps, 1)
    for rank in _ranks(proc):
        rank.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == EXIT_PREEMPTED, _log(work, "task_sigterm")[-3000:]
    stopped = int((out / "stage1" / "checkpoints" / "latest").read_text()[4:])
    assert 1 <= stopped < 4 and not (out / "stage1" / "result.json").exists()
    assert f"stopped at step {stopped} (received SIGTERM); checkpoint {tag_for(stopped)} written" in \
        _log(work, "task_sigterm")

    marker = work / "killed_at"
    proc = _start(spec, "task_kill", {"kill_at_run_step": {"rank": 1, "step": 7}, "kill_marker": str(marker)},
                  script="task_kd.py")
    assert _exits_promptly(proc, marker) != 0
    log = _log(work, "task_kill")
    assert f"stage1/checkpoints/{tag_for(stopped)} at stage1 step {stopped}" in log, log[-3000:]
    assert (out / "stage1" / "result.json").is_file()
    assert (out / "stage2" / "checkpoints" / "latest").read_text() == tag_for(2)

    proc = _start(spec, "task_final", script="task_kd.py")
    assert proc.wait(timeout=600) == 0, _log(work, "task_final")[-3000:]
    log = _log(work, "task_final")
    assert "stage1 already finished" in log and "stage2/checkpoints/step00000002 at stage2 step 2" in log
    assert "run finished at step 8" in log

    (got, got_weights), (want, want_weights) = _task_outcome(out), _task_outcome(tmp_path / "straight" / "out")
    assert got == want
    for stage in ("stage1", "stage2"):
        assert got_weights[stage].keys() == want_weights[stage].keys()
        assert all(torch.equal(got_weights[stage][k], want_weights[stage][k]) for k in want_weights[stage]), stage


@launcher
def test_nonfinite_steps_are_skipped_then_a_burst_stops_the_run(tmp_path, assets, reference_ids):
    """NaN loss on rank 1 at step 2 (skipped, weights and optimizer untouched), then at steps 5-7:
    three in a row stop the run with status 3 and `latest` on step 3; the relaunch resumes."""
    spec = _spec(tmp_path, assets, faults__max_nonfinite_steps=3)
    out = tmp_path / "out"
    prints = tmp_path / "fingerprints.jsonl"
    proc = _start(spec, "nonfinite", {"nonfinite": {"rank": 1, "steps": [2, 5, 6, 7]}, "fingerprints": str(prints)})
    assert proc.wait(timeout=600) == EXIT_NONFINITE, _log(tmp_path, "nonfinite")[-3000:]
    assert "3 optimizer steps in a row had non-finite" in _log(tmp_path, "nonfinite")

    state = {row["step"]: (row["params"], row["optimizer"]) for row in map(json.loads, prints.read_text().splitlines())}
    assert sorted(state) == list(range(1, 8))
    assert state[2] == state[1], "a skipped step changed the weights or the optimizer state"
    assert state[3] != state[2] and state[4] != state[3]
    assert state[5] == state[6] == state[7] == state[4]

    skipped = dict(read_scalars(out / "tensorboard")["train/nonfinite_steps_skipped"])
    assert [skipped[s] for s in range(1, 8)] == [0, 1, 1, 1, 2, 3, 4]
    assert _latest(out) == tag_for(3)
    assert not (out / "checkpoints" / tag_for(6)).exists(), "a checkpoint was written inside the burst"

    _finish(tmp_path, spec, reference_ids, resumed_from=tag_for(3))



def test_zero0_fp32_engine_clips_like_torch_and_reports_the_norm():
    """fp32 without ZeRO: the wrapped step clips from the norm of its finiteness check (DeepSpeed's
    own clipping switched off) and gives the same weights as torch's clip_grad_norm_ + AdamW."""
    h.init_single_process()
    torch.manual_seed(0)
    model = h.Wrapper(h.BertModel(h.tiny_config()))
    reference = h.Wrapper(h.BertModel(h.tiny_config()))
    reference.load_state_dict(model.state_dict())
    model.eval(), reference.eval()  # no dropout: both see the same forward
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.01) for m in (model, reference)]
    config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 0},
              "gradient_clipping": 0.05, "steps_per_print": 10**9}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizers[0], config=config)
    ensure_nonfinite_skipping(engine)
    assert engine.gradient_clipping() == 0.0  # the wrapped step clips instead
    for i in range(2):
        h.train_step(engine, h.batch(i))
        loss = reference(h.batch(i))
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.05)
        assert norm > 0.05  # clipping did happen
        optimizers[1].step()
        trained = {name for name, q in reference.named_parameters() if q.grad is not None}
        optimizers[1].zero_grad()
        assert engine.get_global_grad_norm() == pytest.approx(float(norm), rel=1e-5)
    # (DeepSpeed's all-reduce gives the unused pooler zero gradients, which AdamW then decays)
    for (name, p), q in zip(engine.module.named_parameters(), reference.parameters()):
        if name in trained:
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=name)
    assert len(trained) > 10
