"""The loss presets: the registry, and each baseline against its published formula written out here.

The formulas below are plain torch transcriptions of the authors' code:
TinyBERT — huawei-noah/Pretrained-Language-Model, TinyBERT/task_distill.py (``torch.where(att <= -1e2,
0, att)`` + ``MSELoss()``, one ``fit_dense``, ``soft_cross_entropy`` with ``.mean()``);
DistilBERT — huggingface/transformers, examples/research_projects/distillation/distiller.py
(``KLDivLoss(reduction="batchmean")`` × T² over the real tokens, ``CrossEntropyLoss(ignore_index=-100)``,
``CosineEmbeddingLoss``); MiniLMv2 — cross-entropy fine-tuning on the labels in Stage 2.
"""

from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from tiny_models import tiny_batch, tiny_config, tiny_teacher
from transformers import BertForMaskedLM

from mlkd_scale.losses import DistillationObjective
from mlkd_scale.losses.presets import PRESETS, Preset, register_preset
from mlkd_scale.losses.presets.base import TermInputs
from mlkd_scale.models import FeatureTap, TapRequest, build_student
from mlkd_scale.spec import LossesSpec, SpecError, StudentSpec, TaskSpec, format_validation_error
from mlkd_scale.spec.presets import BUILTIN_PRESETS, known_presets


def _pair(teacher, heads=12, width=24):
    spec = StudentSpec(num_layers=2, hidden_size=width, num_heads=heads, intermediate_size=40)
    return build_student(teacher, spec, [2, 4]).eval()


def _features(teacher, student, objective, batch):
    with torch.no_grad(), FeatureTap(teacher, objective.teacher_request()) as tap:
        t = tap(**batch)
    with FeatureTap(student, objective.student_request()) as tap:
        s = tap(**batch)
    return t, s


# ---- the registry ---------------------------------------------------------------------------------


def test_the_registry_holds_exactly_the_builtin_names_and_each_declares_what_it_reads():
    assert sorted(PRESETS) == sorted(BUILTIN_PRESETS)
    for preset in PRESETS.values():
        assert set(preset.reads) <= set(LossesSpec.model_fields), preset.name
        assert set(preset.terms) == {1, 2}


def test_an_unknown_preset_is_one_spec_error_listing_the_known_ones():
    with pytest.raises(ValidationError) as info:
        from mlkd_scale.spec import RunSpec

        RunSpec.model_validate({"teacher": {"path": "t"}, "losses": {"preset": "tinyberta"},
                                "data": {"sources": [{"path": "x.txt"}]}, "train": {"max_steps": 1}})
    lines = [line for line in format_validation_error(info.value) if line.startswith("losses")]
    assert lines == [
        "losses.preset: unknown preset 'tinyberta'; the known presets are: distilbert, minilmv2, mlkd, tinybert"
    ]
    assert isinstance(SpecError(lines), Exception)


def test_a_preset_registered_elsewhere_is_accepted_by_the_spec_and_runs():
    @register_preset
    class HiddenOnly(Preset):
        name = "hidden_only_test"
        terms: ClassVar[dict[int, tuple[str, ...]]] = {1: ("last",), 2: ("last",)}

        def request(self, weights, teacher):
            return TapRequest(hidden_layers=frozenset({self.last_layer(teacher)}))

        def term_last(self, x: TermInputs) -> torch.Tensor:
            t = x.teacher.hidden[self.setup.layer_map[-1]]
            return x.student.hidden[self.setup.num_student_layers].float().square().mean() + 0 * t.sum()

    try:
        assert "hidden_only_test" in known_presets()
        teacher = tiny_teacher()
        student = _pair(teacher)
        objective = DistillationObjective(LossesSpec(preset="hidden_only_test"), teacher.config, student.config)
        total, terms = objective(*_features(teacher, student, objective, tiny_batch()), tiny_batch()["attention_mask"])
        assert set(terms) == {"last"} and torch.isfinite(total)
    finally:
        PRESETS.pop("hidden_only_test")


# ---- tinybert ---------------------------------------------------------------------------------------


def test_tapped_scores_are_the_unnormalised_scores_of_the_eager_attention():
    teacher = tiny_teacher()
    batch = tiny_batch()
    with torch.no_grad(), FeatureTap(teacher, TapRequest(attention_scores_layers=frozenset({2}))) as tap:
        scores = tap(**batch).attention_scores[2]
    ref = tiny_teacher()
    ref.set_attn_implementation("eager")
    with torch.no_grad():
        probs = ref(**batch, output_attentions=True).attentions[1]
    torch.testing.assert_close(torch.softmax(scores, -1), probs, rtol=0, atol=1e-6)
    padded = batch["attention_mask"][:, None, None, :].expand_as(scores) == 0
    assert (scores[padded] <= -100).all() and (scores[~padded] < 0).any()
    with pytest.raises(ValueError, match="both attention probabilities and scores"):
        FeatureTap(teacher, TapRequest(attention_layers=frozenset({1}), attention_scores_layers=frozenset({1})))


def test_tinybert_stage1_equals_task_distill_py():
    teacher = tiny_teacher()
    student = _pair(teacher).train(False)
    objective = DistillationObjective(LossesSpec(preset="tinybert"), teacher.config, student.config)
    batch = tiny_batch()
    t, s = _features(teacher, student, objective, batch)
    _, terms = objective(t, s, batch["attention_mask"])

    fit_dense, mse = objective.projections[0], torch.nn.MSELoss()

    def zero_masked(att):
        return torch.where(att <= -1e2, torch.zeros_like(att), att)

    pairs = [(1, 2), (2, 4)]
    expected = {
        "emb": mse(fit_dense(s.embeddings), t.embeddings),
        "hidden": sum(mse(fit_dense(s.hidden[n]), t.hidden[m]) for n, m in pairs),
        "attn": sum(mse(zero_masked(s.attention_scores[n]), zero_masked(t.attention_scores[m])) for n, m in pairs),
    }
    for name, value in expected.items():
        torch.testing.assert_close(terms[name], value.detach(), rtol=1e-5, atol=1e-7, msg=name)


def test_tinybert_stage2_is_the_mean_soft_cross_entropy_and_labels_for_regression():
    teacher = tiny_teacher(with_head=True)
    student = _pair(teacher)
    objective = DistillationObjective(LossesSpec(preset="tinybert", kd_temperature=2.0), teacher.config,
                                      student.config, stage=2)
    batch = tiny_batch()
    t, s = _features(teacher, student, objective, batch)
    _, terms = objective(t, s, batch["attention_mask"])
    tau = 2.0
    expected = (-F.softmax(t.logits / tau, -1) * F.log_softmax(s.logits / tau, -1)).mean()
    torch.testing.assert_close(terms["kd"], expected.detach())

    regression = DistillationObjective(LossesSpec(preset="tinybert"), teacher.config, student.config, stage=2,
                                       regression=True)
    assert not regression.teacher_request().logits
    scores = torch.tensor([0.5, 1.0, 4.2, 3.3])
    logits = torch.randn(4, 1)
    _, terms = regression(t, type(s)(logits=logits), batch["attention_mask"], scores)
    torch.testing.assert_close(terms["kd"], F.mse_loss(logits.view(-1), scores))


# ---- distilbert ---------------------------------------------------------------------------------------


def _mlm_pair():
    torch.manual_seed(0)
    teacher = BertForMaskedLM(tiny_config()).eval().requires_grad_(False)
    student = _pair(teacher, heads=4, width=48)
    return teacher, student


def test_distilbert_stage1_equals_distiller_py():
    teacher, student = _mlm_pair()
    objective = DistillationObjective(LossesSpec(preset="distilbert"), teacher.config, student.config)
    assert objective.masked_lm and objective.weights == {"kd": 5.0, "mlm": 2.0, "cos": 1.0}
    assert objective.preset.kd_temperature == 2.0 and len(objective.projections) == 0
    batch = tiny_batch()
    mask = batch["attention_mask"]
    labels = torch.full_like(batch["input_ids"], -100)
    labels[:, 1:3] = batch["input_ids"][:, 1:3]
    t, s = _features(teacher, student, objective, batch)
    total, terms = objective(t, s, mask, labels)

    temperature = 2.0
    sel = mask.bool().unsqueeze(-1).expand_as(s.logits)
    s_slct = torch.masked_select(s.logits, sel).view(-1, s.logits.size(-1))
    t_slct = torch.masked_select(t.logits, sel).view(-1, s.logits.size(-1))
    loss_ce = torch.nn.KLDivLoss(reduction="batchmean")(
        F.log_softmax(s_slct / temperature, dim=-1), F.softmax(t_slct / temperature, dim=-1)
    ) * temperature**2
    loss_mlm = torch.nn.CrossEntropyLoss(ignore_index=-100)(s.logits.view(-1, s.logits.size(-1)), labels.view(-1))
    dim = s.hidden[2].size(-1)
    hsel = mask.bool().unsqueeze(-1).expand_as(s.hidden[2])
    s_h = torch.masked_select(s.hidden[2], hsel).view(-1, dim)
    t_h = torch.masked_select(t.hidden[4], hsel).view(-1, dim)
    loss_cos = torch.nn.CosineEmbeddingLoss()(s_h, t_h, s_h.new_ones(s_h.size(0)))
    for name, value in {"kd": loss_ce, "mlm": loss_mlm, "cos": loss_cos}.items():
        torch.testing.assert_close(terms[name], value.detach(), rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(total.detach(), (5.0 * loss_ce + 2.0 * loss_mlm + loss_cos).detach(), rtol=1e-5, atol=1e-6)


def test_distilbert_stage1_errors_name_what_is_missing():
    teacher, student = _mlm_pair()
    objective = DistillationObjective(LossesSpec(preset="distilbert", weights={"kd": 0, "cos": 0}),
                                      teacher.config, student.config)
    batch = tiny_batch()
    t, s = _features(teacher, student, objective, batch)
    with pytest.raises(ValueError, match="needs the masked-LM labels"):
        objective(t, s, batch["attention_mask"])
    classifier = tiny_teacher(with_head=True)
    student = _pair(classifier, heads=4, width=48)
    objective = DistillationObjective(LossesSpec(preset="distilbert"), classifier.config, student.config)
    t, s = _features(classifier, student, objective, batch)
    with pytest.raises(ValueError, match=r"masked-LM head \(...ForMaskedLM\)"):
        objective(t, s, batch["attention_mask"], torch.zeros(4, dtype=torch.long))


def test_distilbert_stage2_keeps_kd_and_cos_at_unit_weights_and_is_not_masked_lm():
    teacher = tiny_teacher(with_head=True)
    objective = DistillationObjective(LossesSpec(preset="distilbert"), teacher.config, _pair(teacher).config, stage=2)
    assert objective.weights == {"kd": 1.0, "cos": 1.0} and not objective.masked_lm
    assert len(objective.projections) == 1  # the 24-wide student's last state projected for cos


# ---- minilmv2 and mlkd -------------------------------------------------------------------------------


@pytest.mark.parametrize("regression", [False, True])
def test_minilmv2_stage2_on_labels_is_cross_entropy_or_mse(regression):
    teacher = tiny_teacher(with_head=True, num_labels=1 if regression else 3)
    student = _pair(teacher, heads=4)
    losses = LossesSpec(preset="minilmv2", stage2_target="labels", relation_heads=12)
    objective = DistillationObjective(losses, teacher.config, student.config, stage=2, regression=regression)
    assert set(objective.weights) == {"ce"} and not objective.teacher_request().logits
    batch = tiny_batch()
    labels = torch.tensor([0.5, 1.0, 4.2, 3.3]) if regression else torch.tensor([0, 1, 0, 2])
    t, s = _features(teacher, student, objective, batch)
    _, terms = objective(t, s, batch["attention_mask"], labels)
    expected = F.mse_loss(s.logits.view(-1), labels) if regression else F.cross_entropy(s.logits, labels)
    torch.testing.assert_close(terms["ce"], expected.detach())
    with pytest.raises(ValueError, match="not available for question answering"):
        DistillationObjective(losses, teacher.config, student.config, stage=2, qa=True)


def test_stage2_target_labels_is_a_minilmv2_setting():
    with pytest.raises(ValidationError, match="stage2_target: 'labels' is a minilmv2 setting"):
        LossesSpec(stage2_target="labels")


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_ffn_reduction_sums_or_averages_the_mapped_layers(reduction):
    teacher = tiny_teacher()
    student = _pair(teacher, heads=3)
    objective = DistillationObjective(LossesSpec(ffn_reduction=reduction), teacher.config, student.config)
    batch = tiny_batch()
    t, s = _features(teacher, student, objective, batch)
    _, terms = objective(t, s, batch["attention_mask"])
    real = batch["attention_mask"].float()[..., None]
    per_layer = [
        ((objective.projections[n - 1](s.hidden[n]) - t.hidden[m]).square() * real).sum() / (real.sum() * 48)
        for n, m in [(1, 2), (2, 4)]
    ]
    expected = sum(per_layer) / (2 if reduction == "mean" else 1)
    torch.testing.assert_close(terms["ffn"], expected.detach(), rtol=1e-5, atol=1e-7)


def test_preset_defaults_for_projection_and_temperature():
    config = tiny_config()
    mlkd = DistillationObjective(LossesSpec(), config, config)
    assert mlkd.preset.projection == "per_layer" and len(mlkd.projections) == 4 and mlkd.preset.kd_temperature == 1.0
    shared = DistillationObjective(LossesSpec(projection="shared"), config, config)
    assert len(shared.projections) == 1
    assert not mlkd.masked_lm


def test_augment_stage2_needs_an_augmentation_cache():
    with pytest.raises(ValidationError, match="augment_stage2: needs augmented_dir"):
        TaskSpec(name="sst2", augment_stage2=True)
    assert TaskSpec(name="sst2", augment_stage2=True, augmented_dir="cache").augment_stage2
