"""The teacher cache of task distillation (mlkd_scale/engine/task/teacher_cache.py).

* the losses of every preset's task stages from cached features equal those from the live teacher
  on the same shuffled batch: bit for bit with fp32 (or the teacher's bf16) storage; with fp16 storage
  of an fp32 teacher they equal the live features rounded to fp16, bit for bit, and the live losses
  within the rounding's effect (tolerance below);
* a changed teacher, data or spec makes a new cache (and the old one goes); a killed build resumes at
  its last commit, uncommitted rows recomputed; a damaged cache is rebuilt, never read;
* the size rule, the switch, a stage that reads nothing from the teacher;
* whole runs: a cached run stopped and resumed reuses its cache and has the live run's losses and
  dev metrics; the same on two ranks through the deepspeed launcher, each rank computing its shard.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from run_fixtures import check_ok, save_tiny_bert
from task_fixtures import GLUE, make_task_teacher, run_task_launcher, task_spec
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from mlkd_scale.engine.epoch_clock import EpochClock
from mlkd_scale.engine.task import teacher_cache
from mlkd_scale.engine.task.distill import run_task_kd
from mlkd_scale.engine.task.teacher_cache import (
    POOLED,
    flat_features,
    open_teacher_cache,
    teacher_fingerprint,
    unflat_features,
)
from mlkd_scale.engine.task.teacher_cache_store import (
    COMPLETE,
    PROGRESS,
    ShardWriter,
    from_storage,
    to_storage,
)
from mlkd_scale.engine.trackers import read_scalars
from mlkd_scale.losses import DistillationObjective
from mlkd_scale.models import FeatureTap
from mlkd_scale.spec import SpecError, load_spec
from mlkd_scale.tasks.glue.table import get_task
from mlkd_scale.tasks.registry import open_task

#: (preset, stage, losses overrides): every task stage a preset has (distilbert's stage 1 distils
#: masked-LM logits, which a task teacher does not have; minilmv2's stage 2 with labels reads nothing)
CASES = [
    ("mlkd", 1, {}), ("mlkd", 2, {}), ("tinybert", 1, {}), ("tinybert", 2, {}),
    ("minilmv2", 1, {"relation_heads": 4}), ("minilmv2", 2, {}), ("distilbert", 2, {}),
]
#: fp16 keeps 11 significant bits: each cached value is off by at most 2^-11 relative (4.9e-4). The
#: loss terms are sums of smooth functions of those values, whose rounding errors mostly cancel: on
#: these models each term moved by at most 1.2e-4 relative (measured); 1e-3 bounds that with room and
#: fails on any wrong row, layer or order (those move the terms by tens of percent).
FP16_RTOL = 1e-3


class Ctx:
    """What open_teacher_cache reads of a TaskContext; records what it prints."""

    def __init__(self, spec, world):
        self.spec, self.dist, self.lines = spec, world, []
        self.output_dir = Path(spec.run.output_dir)

    def print(self, *lines):
        self.lines.extend(lines)


def _setup(tmp: Path, world, teacher_dir: Path, spec_name: str = "spec.json", **overrides):
    tmp.mkdir(parents=True, exist_ok=True)
    spec = load_spec(task_spec(tmp, teacher_dir, "SST-2", path=tmp / spec_name, **overrides))
    task = open_task(spec.task)
    teacher, _ = task.load_teacher(spec.teacher.path, spec.teacher.dtype)
    split = task.load_data(AutoTokenizer.from_pretrained(teacher_dir), with_augmented=False).train
    return Ctx(spec, world), teacher, split


def _sharp_teacher(directory: Path) -> Path:
    """A tiny SST-2 teacher with larger random weights than the default init (std 0.3, not 0.02), whose
    relations are far from uniform, so that no loss term is ~0 for teacher and student alike."""
    names = get_task("SST-2").label_names
    return save_tiny_bert(directory, BertForSequenceClassification, 0, num_labels=2, initializer_range=0.3,
                          id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})


def _student(teacher, heads: int) -> BertForSequenceClassification:
    torch.manual_seed(1)
    config = BertConfig(vocab_size=teacher.config.vocab_size, hidden_size=24, num_hidden_layers=2, num_labels=2,
                        num_attention_heads=heads, intermediate_size=48, max_position_embeddings=64,
                        initializer_range=0.3)
    return BertForSequenceClassification(config).eval()


def _open(ctx, teacher, split, stage: int = 1, student_layers: int = 2):
    """The stage's cache for ctx.spec (a student of ``student_layers`` layers decides the request)."""
    config = BertConfig(hidden_size=24, num_hidden_layers=student_layers, num_attention_heads=3)
    objective = DistillationObjective(ctx.spec.losses, teacher.config, config, stage)
    with FeatureTap(teacher, objective.teacher_request()) as tap:
        return open_teacher_cache(ctx, f"stage{stage}", tap, split, teacher_fingerprint(teacher, ctx.dist.device))


def _losses(objective, teacher_feats, student_feats, batch):
    total, terms = objective(teacher_feats, student_feats, batch["attention_mask"], batch["labels"])
    return {"total": total.detach(), **terms}


def _compare(tmp: Path, world, case: tuple, teacher_dtype: torch.dtype, cache_dtype: str) -> SimpleNamespace:
    """The live and the cached teacher features of one shuffled batch, and the case's losses from each."""
    preset, stage, losses = case
    teacher_dir = _sharp_teacher(tmp / "teacher")
    ctx, teacher, split = _setup(tmp, world, teacher_dir, losses={"preset": preset, **losses},
                                 teacher__cache_dtype=cache_dtype)
    teacher.to(teacher_dtype)
    student = _student(teacher, heads=12 if preset == "tinybert" else 3)
    objective = DistillationObjective(ctx.spec.losses, teacher.config, student.config, stage)
    index = torch.tensor([7, 2, 11, 2, 5, 0])  # shuffled, with a repeat (a wrapped epoch has them)
    batch = split.batch(index)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    t_tap, s_tap = FeatureTap(teacher, objective.teacher_request()), FeatureTap(student, objective.student_request())
    with t_tap, s_tap:
        cache = open_teacher_cache(ctx, f"stage{stage}", t_tap, split, teacher_fingerprint(teacher, world.device))
        with torch.no_grad():
            live = t_tap(**inputs)
        cached = cache.features(index)
        student_feats = s_tap(**inputs)
    return SimpleNamespace(
        objective=objective, live=live, cached=cached, student=student_feats, batch=batch,
        from_live=_losses(objective, live, student_feats, batch),
        from_cache=_losses(objective, cached, student_feats, batch),
    )


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-stage{c[1]}")
def test_losses_from_an_fp32_cache_equal_the_live_teachers(tmp_path: Path, world, case) -> None:
    r = _compare(tmp_path, world, case, torch.float32, "fp32")
    flat_live, flat_cached = flat_features(r.live), flat_features(r.cached)
    assert set(flat_cached) == set(flat_live) and flat_live
    assert all(torch.equal(flat_cached[k], flat_live[k]) for k in flat_live)
    assert set(r.from_cache) == set(r.objective.weights) | {"total"}
    assert all(torch.equal(r.from_cache[k], r.from_live[k]) for k in r.from_live), (r.from_cache, r.from_live)
    assert all(abs(float(v)) > 1e-3 for v in r.from_live.values())  # no term is trivially equal


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-stage{c[1]}")
def test_losses_from_an_fp16_cache_are_the_live_features_rounded(tmp_path: Path, world, case) -> None:
    r = _compare(tmp_path, world, case, torch.float32, "auto")
    rounded = {k: v if k in POOLED else v.half().float() for k, v in flat_features(r.live).items()}
    from_rounded = _losses(r.objective, unflat_features(rounded), r.student, r.batch)
    assert all(torch.equal(r.from_cache[k], from_rounded[k]) for k in r.from_live)
    for key, value in r.from_live.items():
        assert float(r.from_cache[key]) == pytest.approx(float(value), rel=FP16_RTOL), key


@pytest.mark.parametrize("case", CASES[:3], ids=lambda c: f"{c[0]}-stage{c[1]}")
def test_a_bf16_teachers_cache_is_exact(tmp_path: Path, world, case) -> None:
    r = _compare(tmp_path, world, case, torch.bfloat16, "auto")
    flat = flat_features(r.cached)
    assert all(t.dtype == torch.bfloat16 for t in flat.values())
    assert all(torch.equal(flat[k], v) for k, v in flat_features(r.live).items())
    assert all(torch.equal(r.from_cache[k], r.from_live[k]) for k in r.from_live)


def test_a_changed_teacher_data_or_spec_makes_a_new_cache(tmp_path: Path, world) -> None:
    teacher_dir = make_task_teacher(tmp_path / "teacher", "SST-2")
    root = tmp_path / "out" / "teacher_cache"

    def stage1_dir(spec_name="spec.json", student_layers=2, **overrides) -> tuple[str, list[str]]:
        ctx, teacher, split = _setup(tmp_path, world, teacher_dir, spec_name, **overrides)
        cache = _open(ctx, teacher, split, student_layers=student_layers)
        assert [p.name for p in root.glob("stage1-*")] == [cache.directory.name]  # the old ones are gone
        return cache.directory.name, ctx.lines

    first, lines = stage1_dir()
    assert any("stage1: teacher cache built" in line for line in lines)
    again, lines = stage1_dir()
    assert again == first and any("stage1: teacher cache reused" in line for line in lines)

    data = tmp_path / "data" / "SST-2"
    data.mkdir(parents=True)
    for name in ("train.tsv", "dev.tsv"):
        (data / name).write_text((GLUE / "SST-2" / name).read_text())
    same_text, _ = stage1_dir("copy.json", task__data_dir=str(data))
    assert same_text == first  # the same inputs in another folder: the same cache
    rows = (data / "train.tsv").read_text().splitlines()
    rows[3] = "an entirely different sentence .\t" + rows[3].split("\t")[1]
    (data / "train.tsv").write_text("\n".join(rows) + "\n")
    names = {first, stage1_dir("edited.json", task__data_dir=str(data))[0]}
    names.add(stage1_dir("length.json", task__max_seq_length=24)[0])
    names.add(stage1_dir("mapping.json", losses={"layer_mapping": [1, 3]})[0])
    names.add(stage1_dir("three.json", student_layers=3)[0])  # uniform mapping: other teacher layers
    names.add(stage1_dir("preset.json", losses={"preset": "tinybert", "weights": {"attn": 0.0}})[0])
    names.add(stage1_dir("dtype.json", teacher__cache_dtype="fp32")[0])
    make_task_teacher(teacher_dir, "SST-2", seed=5)  # re-trained, at the same path
    names.add(stage1_dir()[0])
    assert len(names) == 8


def _shard_bytes(cache_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((cache_dir / "rank00000").glob("*.bin"))}


def test_a_killed_build_resumes_at_its_last_commit_and_damage_is_rebuilt(tmp_path: Path, world, monkeypatch):
    teacher_dir = make_task_teacher(tmp_path / "teacher", "SST-2")
    monkeypatch.setattr(teacher_cache, "COMMIT_ROWS", 4)  # batches of 2: a commit every second batch
    fresh_ctx, teacher, split = _setup(tmp_path / "fresh", world, teacher_dir, task__eval_batch_size=2)
    fresh = _shard_bytes(_open(fresh_ctx, teacher, split).directory)

    forwards, writes = [], []
    real_forward, real_write = teacher_cache._teacher_forward, ShardWriter.write

    def recorded(*args, **kwargs):
        forwards.append(args[2])
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(teacher_cache, "_teacher_forward", recorded)

    def killed_at_the_fourth(self, start, arrays):
        if len(writes) == 3:
            raise RuntimeError("killed")
        writes.append(start)
        real_write(self, start, arrays)

    monkeypatch.setattr(ShardWriter, "write", killed_at_the_fourth)
    ctx, teacher, split = _setup(tmp_path, world, teacher_dir, task__eval_batch_size=2)
    with pytest.raises(RuntimeError, match="killed"):
        _open(ctx, teacher, split)
    shard = next((tmp_path / "out" / "teacher_cache").glob("stage1-*")) / "rank00000"
    assert not (shard / COMPLETE).exists() and json.loads((shard / PROGRESS).read_text())["rows"] == 4
    for path in shard.glob("*.bin"):  # rows 4-5 were written but not committed: scribble over them
        data = bytearray(path.read_bytes())
        row = len(data) // len(split)
        data[4 * row : 6 * row] = b"\x7f" * (2 * row)
        path.write_bytes(bytes(data))

    monkeypatch.setattr(ShardWriter, "write", real_write)
    forwards.clear()
    cache = _open(ctx, teacher, split)
    assert forwards == [[0], [4, 5], [6, 7], [8, 9], [10, 11]]  # the probe, then from the last commit on
    assert any("teacher cache built" in line for line in ctx.lines)
    assert _shard_bytes(cache.directory) == fresh

    damages = [lambda: (shard / "hidden.4.bin").write_bytes((shard / "hidden.4.bin").read_bytes()[:-2]),
               lambda: (shard / COMPLETE).write_text("0" * 64)]
    for damage in damages:
        damage()
        ctx.lines.clear()
        cache = _open(ctx, teacher, split)
        assert any("teacher cache built" in line for line in ctx.lines) and _shard_bytes(cache.directory) == fresh


def test_the_size_rule_the_switch_and_a_stage_that_reads_nothing(tmp_path: Path, world, monkeypatch) -> None:
    teacher_dir = make_task_teacher(tmp_path / "teacher", "SST-2")
    ctx, teacher, split = _setup(tmp_path, world, teacher_dir, teacher__cache_max_gib=1e-6)
    assert _open(ctx, teacher, split, stage=1) is None
    assert "more than teacher.cache_max_gib = 1e-06" in ctx.lines[-1] and "live teacher" in ctx.lines[-1]
    ctx, teacher, split = _setup(tmp_path, world, teacher_dir, "zero.json", teacher__cache_max_gib=0)
    assert _open(ctx, teacher, split, stage=1) is None
    cache = _open(ctx, teacher, split, stage=2)  # [CLS] and logits whatever the size rule says
    assert set(cache.fields) == {"cls", "logits"}

    ctx, teacher, split = _setup(tmp_path, world, teacher_dir, "labels.json",
                                 losses={"preset": "minilmv2", "stage2_target": "labels"})
    cache = _open(ctx, teacher, split, stage=2)
    assert "read nothing from the teacher" in ctx.lines[-1]
    assert flat_features(cache.features(torch.tensor([3, 1]))) == {}

    spec = task_spec(tmp_path, teacher_dir, "SST-2", path=tmp_path / "off.json", teacher__cache=False, run__output_dir=str(tmp_path / "off"),
                     task__stage1={"max_steps": 1, "lr": 1e-3}, task__stage2={"max_steps": 1, "lr": 1e-3})
    monkeypatch.setattr("mlkd_scale.engine.task.distill.open_teacher_cache", lambda *a: pytest.fail("cache opened"))
    assert run_task_kd(load_spec(spec), dist=world)["finished"]


def test_the_spec_fields_have_their_defaults_and_reject_bad_values(tmp_path: Path) -> None:
    teacher_dir = make_task_teacher(tmp_path / "teacher", "SST-2")
    teacher = load_spec(task_spec(tmp_path, teacher_dir, "SST-2")).teacher
    assert (teacher.cache, teacher.cache_max_gib, teacher.cache_dtype) == (True, 4.0, "auto")
    bad = task_spec(tmp_path, teacher_dir, "SST-2", path=tmp_path / "bad.json", teacher__cache_max_gib=-1,
                    teacher__cache_dtype="fp8")
    with pytest.raises(SpecError) as error:
        load_spec(bad)
    assert "teacher.cache_max_gib" in str(error.value) and "teacher.cache_dtype" in str(error.value)


def test_storage_saturates_the_mask_marker_and_refuses_overflow() -> None:
    scores = torch.tensor([[1.5, torch.finfo(torch.float32).min, -3.0]])
    stored = from_storage(to_storage(scores, "float16"), "float16")
    assert stored.tolist() == [[1.5, -65504.0, -3.0]]  # still <= -100: TinyBERT's loss zeroes it, as before
    with pytest.raises(OverflowError, match="teacher.cache_dtype: .* set teacher.cache_dtype to bf16 or fp32"):
        to_storage(torch.tensor([[7e4]]), "float16")
    values = torch.randn(3, 5).bfloat16()
    assert torch.equal(from_storage(to_storage(values, "bfloat16"), "bfloat16"), values)


def test_an_overflowing_feature_stops_the_build_with_the_fix(tmp_path: Path, world, monkeypatch) -> None:
    teacher_dir = make_task_teacher(tmp_path / "teacher", "SST-2")
    ctx, teacher, split = _setup(tmp_path, world, teacher_dir)
    real = teacher_cache._teacher_forward

    def huge(*args, **kwargs):
        return {k: v * 1e6 for k, v in real(*args, **kwargs).items()}

    monkeypatch.setattr(teacher_cache, "_teacher_forward", huge)
    with pytest.raises(SpecError, match="set teacher.cache_dtype to bf16 or fp32"):
        _open(ctx, teacher, split)
    assert not list((tmp_path / "out" / "teacher_cache").glob(f"*/rank00000/{COMPLETE}"))


def test_the_epoch_clock_counts_steps_into_epochs() -> None:
    clock = EpochClock(examples=10, global_batch=4)  # 2.5 steps per epoch: epochs end at steps 3, 5, 8
    ends = []
    for step in range(1, 9):
        clock.start()
        ends.append(clock.stop(step, last=step == 8) is not None)
    assert ends == [False, False, True, False, True, False, False, True]
    assert [(e["epoch"], e["steps"]) for e in clock.report()] == [(0, 3), (1, 2), (2, 3)]


# ---- whole runs ------------------------------------------------------------------------------------


def _scalars(out: Path) -> dict:
    return {k: v for k, v in read_scalars(out / "tensorboard").items() if "/loss/" in k or k.startswith("eval/")}


def test_a_resumed_cached_run_reuses_its_cache_and_has_the_live_runs_losses(tmp_path: Path, world, capsys) -> None:
    teacher = make_task_teacher(tmp_path / "teacher", "MRPC")
    budget = {"max_steps": 3, "lr": 1e-3}
    common = {"task__stage1": budget, "task__stage2": budget, "task__eval_every_n_steps": 1}
    outputs = {}
    for kind, cache, stops in (("live", False, ()), ("cached", True, (2, 5))):
        (tmp_path / kind).mkdir()
        spec = task_spec(tmp_path / kind, teacher, "MRPC", teacher__cache=cache, teacher__cache_dtype="fp32",
                         **common)
        outputs[kind] = []
        for stop in (*stops, None):
            run_task_kd(load_spec(spec), stop_after_steps=stop, dist=world)
            outputs[kind].append(capsys.readouterr().out)
    first, second, third = outputs["cached"]
    assert "stage1: teacher cache built" in first and "stage1: teacher cache reused" in second
    assert "stage2: teacher cache built" in second and "stage2: teacher cache reused" in third
    assert "stage1: live teacher (teacher.cache is false)" in outputs["live"][0]
    cached, live = _scalars(tmp_path / "cached" / "out"), _scalars(tmp_path / "live" / "out")
    assert set(cached) == set(live) and "stage1/loss/mha" in cached and "stage2/loss/sc" in cached
    assert cached == live
    result = json.loads((tmp_path / "cached" / "out" / "stage2" / "result.json").read_text())
    assert [e["steps"] for e in result["epoch_seconds"]] == [1]  # this launch ran step 3 of stage 2 only


def test_augmented_stage1_data_is_cached_or_falls_back_by_size(tmp_path: Path, world, capsys) -> None:
    from test_task_data import _CopyAugmenter

    from mlkd_scale.data.augment.augmenter import augment_dataset
    from mlkd_scale.data.augment.inputs import read_examples

    preset = get_task("sst-2").augment
    examples = read_examples(GLUE / "SST-2" / "train.tsv", preset.text_a, preset.text_b, preset.label)
    augment_dataset(examples, tmp_path / "aug", _CopyAugmenter())  # 2 variants of each of the 12 examples
    teacher = make_task_teacher(tmp_path / "teacher", "SST-2")
    budget = {"max_steps": 1, "lr": 1e-3}
    # per example: embeddings + 2 context + 2 hidden layers of [32, 48] in fp16 = 15,360 bytes
    for kind, limit in (("fits", 4.0), ("small", 20 * 15360 / 2**30)):
        (tmp_path / kind).mkdir()
        spec = task_spec(tmp_path / kind, teacher, "SST-2", task__augmented_dir=str(tmp_path / "aug"),
                         task__stage1=budget, task__stage2=budget, teacher__cache_max_gib=limit)
        run_task_kd(load_spec(spec), dist=world)
        out = capsys.readouterr().out
        assert re.search(r"stage2: teacher cache built in [\d.]+ s \(cls, logits of 12 examples\)", out)
        if kind == "fits":
            assert re.search(r"stage1: teacher cache built in [\d.]+ s \(embeddings, context x2, hidden x2 of 24 "
                             r"examples; per-token 0.35 MiB in float16\)", out)
        else:
            assert "stage1: live teacher: the per-token features its losses read take 0.35 MiB over 24 examples" in out


def test_two_ranks_each_compute_a_shard_and_train_as_the_live_teacher(tmp_path: Path) -> None:
    teacher = make_task_teacher(tmp_path / "teacher", "SST-2")
    budget = {"epochs": 4, "lr": 1e-3}  # 6 steps of 2 x 4 examples
    runs = {}
    for kind, cache in (("live", False), ("cached", True)):
        (tmp_path / kind).mkdir()
        spec = task_spec(tmp_path / kind, teacher, "SST-2", teacher__cache=cache, teacher__cache_dtype="fp32",
                         task__stage1=budget, task__stage2=budget)  # micro batches of 4: see teacher_cache's doc
        proc = check_ok(run_task_launcher("task_kd.py", spec))
        runs[kind] = tmp_path / kind / "out"
    assert "stage1: teacher cache built" in proc.stdout
    shards = sorted((runs["cached"] / "teacher_cache").glob("stage1-*/rank*"))
    assert [s.name for s in shards] == ["rank00000", "rank00001"]
    rows = [np.fromfile(s / "hidden.4.bin", dtype=np.float32).size // (32 * 48) for s in shards]
    assert rows == [6, 6]  # the 12 examples split by index parity
    assert _scalars(runs["cached"]) == _scalars(runs["live"])
