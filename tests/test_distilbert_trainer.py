"""The distilbert preset's data and model side in general distillation, on one in-process CPU rank:
MLM-head teacher and student, the same masked ids for both, the labels reaching the objective."""

from __future__ import annotations

import logging

import torch
from run_fixtures import make_corpus, make_spec, save_tiny_bert
from tiny_models import tiny_config
from transformers import BertForMaskedLM

from mlkd_scale.data.corpus.mlm_masking import IGNORE_INDEX, mask_tokens, masking_generator
from mlkd_scale.engine.general_kd import Trainer, reads_masked_lm
from mlkd_scale.losses import DistillationObjective
from mlkd_scale.models import FeatureTap, TapRequest
from mlkd_scale.models.taps import encoder_modules
from mlkd_scale.spec import load_spec


def distilbert_spec(tmp_path, teacher):
    corpus = make_corpus(tmp_path / "docs.jsonl", docs=120)
    path = make_spec(
        tmp_path,
        teacher,
        corpus,
        losses__preset="distilbert",
        train__zero_stage=0,
        student__num_heads=12,
        student__hidden_size=48,
        student__intermediate_size=96,
        student__init="teacher_layers",
        train__gradient_accumulation_steps=2,
    )
    return load_spec(path)


def close(trainer: Trainer) -> None:
    """What Trainer.train closes at its end (these tests step the trainer themselves)."""
    trainer.runner.close_logs()
    trainer.batches.close()


class Recorder:
    """The raw batches the stream hands out, the ids each model sees, the labels the objective gets."""

    def __init__(self, trainer: Trainer, monkeypatch):
        self.raw, self.teacher_ids, self.student_ids, self.labels = [], [], [], []
        next_batch = trainer.stream.next_batch

        def recording_next_batch(size):
            batch = next_batch(size)
            self.raw.append(batch["input_ids"].clone())
            return batch

        monkeypatch.setattr(trainer.stream, "next_batch", recording_next_batch)
        trainer.teacher.register_forward_pre_hook(self._ids(self.teacher_ids), with_kwargs=True)
        trainer.engine.module.student.register_forward_pre_hook(self._ids(self.student_ids), with_kwargs=True)
        forward = DistillationObjective.forward

        def recording_forward(objective, teacher, student, attention_mask=None, labels=None, span_mask=None):
            self.labels.append(labels)
            return forward(objective, teacher, student, attention_mask, labels, span_mask)

        monkeypatch.setattr(DistillationObjective, "forward", recording_forward)

    @staticmethod
    def _ids(store):
        def hook(_module, _args, kwargs):
            store.append(kwargs["input_ids"].clone())

        return hook


def test_mlm_models_same_masked_ids_and_labels_reach_the_objective(tmp_path, world, monkeypatch, caplog):
    teacher = save_tiny_bert(tmp_path / "teacher")  # a bare BertModel: its MLM head is missing
    spec = distilbert_spec(tmp_path, teacher)
    with caplog.at_level(logging.WARNING, logger="mlkd_scale"):
        trainer = Trainer(spec, dist=world)
    try:
        warned = [r.getMessage() for r in caplog.records if r.name == "mlkd_scale"]
        assert any(str(teacher) in m and "cls.predictions" in m for m in warned), warned
        assert (
            type(trainer.teacher) is BertForMaskedLM
            and type(trainer.engine.module.student) is BertForMaskedLM
        )
        _, t_layers = encoder_modules(trainer.teacher)
        _, s_layers = encoder_modules(trainer.engine.module.student)
        assert torch.equal(
            s_layers[1].output.dense.weight, t_layers[3].output.dense.weight
        )  # every other: 1, 4

        seen = Recorder(trainer, monkeypatch)
        for _ in range(2):
            trainer.runner.train_step()
        assert len(seen.raw) == len(seen.labels) == 4  # 2 steps x 2 micro batches
        special = torch.tensor(trainer.tokenizer.all_special_ids)
        for index, (raw, labels) in enumerate(zip(seen.raw, seen.labels)):
            step, micro = index // 2 + 1, index % 2
            expected = mask_tokens(
                raw,
                special,
                trainer.tokenizer.mask_token_id,
                trainer.teacher.config.vocab_size,
                masking_generator(spec.run.seed, 0, step, micro),
                spec.data.mlm_probability,
            )
            assert torch.equal(seen.teacher_ids[index], expected[0]) and torch.equal(
                seen.student_ids[index], expected[0]
            )
            assert torch.equal(labels, expected[1]) and labels.shape == raw.shape
            picked = labels != IGNORE_INDEX
            assert not torch.isin(raw[picked], special).any()
            assert 0.1 < picked.float().mean() < 0.2
    finally:
        close(trainer)


def test_a_teacher_with_a_trained_mlm_head_gives_no_warning_and_other_presets_stay_unmasked(
    tmp_path, world, monkeypatch, caplog
):
    teacher = save_tiny_bert(tmp_path / "teacher", model_class=BertForMaskedLM)
    with caplog.at_level(logging.WARNING, logger="mlkd_scale"):
        trainer = Trainer(distilbert_spec(tmp_path, teacher), dist=world)
    close(trainer)
    assert not [r for r in caplog.records if "no trained weights" in r.getMessage()]

    corpus = make_corpus(tmp_path / "more.jsonl", docs=60)
    (tmp_path / "mlkd").mkdir()
    mlkd = load_spec(make_spec(tmp_path / "mlkd", teacher, corpus, train__zero_stage=0))
    trainer = Trainer(mlkd, dist=world)
    try:
        assert trainer.masker is None and type(trainer.teacher).__name__ == "BertModel"
        seen = Recorder(trainer, monkeypatch)
        trainer.runner.train_step()
        assert seen.labels == [None, None] and torch.equal(seen.teacher_ids[0], seen.raw[0])
    finally:
        close(trainer)


def test_the_tap_of_an_mlm_model_returns_logits_over_the_vocabulary():
    model = BertForMaskedLM(tiny_config(layers=2)).eval()
    ids = torch.randint(5, 120, (3, 10))
    with torch.no_grad():
        features = FeatureTap(model, TapRequest(logits=True))(input_ids=ids)
    assert features.logits.shape == (3, 10, 120)  # [B, L, V]


def test_deciding_the_model_class_leaves_the_random_state_alone(tmp_path):
    teacher = save_tiny_bert(tmp_path / "teacher")
    spec = distilbert_spec(tmp_path, teacher)
    before = torch.get_rng_state()
    assert reads_masked_lm(spec)
    assert torch.equal(before, torch.get_rng_state())
    mlkd = spec.model_copy(update={"losses": spec.losses.model_copy(update={"preset": "mlkd"})})
    assert not reads_masked_lm(mlkd)
