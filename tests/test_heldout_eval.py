"""Evaluation during general distillation: held-out documents (never trained on, the same at any
world size), the held-out loss and agreement in TensorBoard, the best checkpoint pinned, kept
across a resume and exported."""

import json

import pytest
from run_fixtures import check_ok, make_spec, run_launcher, sample_ids
from transformers import AutoTokenizer

from mlkd_scale.data.corpus.heldout import heldout_texts, is_heldout
from mlkd_scale.data.corpus.stream import PackedStream
from mlkd_scale.engine.trackers import read_scalars
from mlkd_scale.spec import SpecError, load_spec


def test_the_hash_holds_out_the_asked_share_and_depends_on_the_seed():
    ids = [f"0:0:{i}" for i in range(20000)]
    share = sum(is_heldout(i, 1, 0.1) for i in ids) / len(ids)
    assert 0.09 < share < 0.11
    assert [is_heldout(i, 1, 0.1) for i in ids[:200]] != [is_heldout(i, 2, 0.1) for i in ids[:200]]
    assert not any(is_heldout(i, 1, 0.0) for i in ids[:200])


@pytest.mark.parametrize("world_size", [1, 2])
def test_held_out_documents_are_never_trained_on_at_any_world_size(tmp_path, assets, world_size):
    teacher, corpus = assets
    spec = load_spec(make_spec(tmp_path, teacher, corpus, data__heldout_fraction=0.2))
    held = {doc_id for doc_id, _ in heldout_texts(spec.data, spec.run.seed, limit=10**6)}
    assert 40 < len(held) < 130  # of 400 documents
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    trained = set()
    for rank in range(world_size):
        stream = PackedStream(spec.data, tokenizer, rank, world_size, spec.run.seed)
        for _ in range(60):
            for row in stream.next_batch(4)["doc_ids"]:
                trained.update(row)
        assert stream.stats()["documents_heldout"] > 0
    assert trained and not trained & held
    assert len(trained | held) > 300


def test_eval_needs_held_out_documents_and_a_general_run(tmp_path, assets):
    teacher, corpus = assets
    with pytest.raises(SpecError, match="eval.every_n_steps: evaluation needs held-out documents; set data.heldout_fraction"):
        load_spec(make_spec(tmp_path, teacher, corpus, eval__every_n_steps=2))


@pytest.mark.launcher
def test_a_run_evaluates_pins_the_best_resumes_with_it_and_exports_it(tmp_path, assets):
    teacher, corpus = assets
    spec = make_spec(tmp_path, teacher, corpus, data__heldout_fraction=0.2, eval__every_n_steps=2,
                     eval__max_documents=16, checkpoint__every_n_steps=2, checkpoint__keep_last=1, train__max_steps=6)
    first = check_ok(run_launcher(spec, "--stop_after_steps", "4"))
    assert "step 2: held-out loss" in first.stdout
    out = tmp_path / "out"
    best = json.loads((out / "checkpoints" / "best.json").read_text())
    second = check_ok(run_launcher(spec))
    assert "resumed from" in second.stdout

    scalars = read_scalars(out / "tensorboard")
    agreement = dict(scalars["eval/agreement"])
    assert sorted(agreement) == [2, 4, 6] and all(-1 <= v <= 1 for v in agreement.values())
    assert sorted(dict(scalars["eval/loss_total"])) == [2, 4, 6]
    best_step = max(agreement, key=agreement.get)
    final = json.loads((out / "checkpoints" / "best.json").read_text())
    assert final["step"] == best_step and final["value"] == pytest.approx(agreement[best_step])
    if best["step"] == 2 and agreement[2] >= max(agreement[4], agreement[6]):
        assert final == best  # the first launch's best survived the resume
    kept = sorted(p.name for p in (out / "checkpoints").glob("step*"))
    assert f"step{best_step:08d}" in kept, "keep_last pruned the best checkpoint"
    assert dict(scalars["eval/best_agreement"])[6] == pytest.approx(agreement[best_step])

    exported = json.loads((out / "student" / "mlkd_export.json").read_text())
    assert exported["step"] == best_step
    assert "heldout/eval/agreement" in (out / "student" / "README.md").read_text()

    spec_obj = load_spec(spec)
    held = {doc_id for doc_id, _ in heldout_texts(spec_obj.data, spec_obj.run.seed, limit=10**6)}
    assert not set(sample_ids(out)) & held
