"""The objective: presets, stages, projections, and a 12-head teacher teaching a 3/4-head student."""

import pytest
import torch
from tiny_models import tiny_batch, tiny_teacher

from mlkd_scale.losses import DistillationObjective
from mlkd_scale.models import FeatureTap, build_student
from mlkd_scale.spec import LossesSpec, StudentSpec


def _setup(preset="mlkd", stage=1, heads=3, width=24, with_head=False, teacher_heads=12, **loss_kw):
    teacher = tiny_teacher(with_head=with_head, heads=teacher_heads)
    spec = StudentSpec(num_layers=2, hidden_size=width, num_heads=heads, intermediate_size=40)
    losses = LossesSpec(preset=preset, **loss_kw)
    student = build_student(teacher, spec, [2, 4])
    objective = DistillationObjective(losses, teacher.config, student.config, stage)
    return teacher, student, objective


def _step(teacher, student, objective, batch, labels=None):
    with torch.no_grad(), FeatureTap(teacher, objective.teacher_request()) as t_tap:
        t_feats = t_tap(**batch)
    with FeatureTap(student, objective.student_request()) as s_tap:
        s_feats = s_tap(**batch)
    return objective(t_feats, s_feats, batch["attention_mask"], labels)


@pytest.mark.parametrize("heads", [3, 4])
def test_twelve_head_teacher_trains_a_student_with_fewer_heads_of_another_width(heads):
    teacher, student, objective = _setup(heads=heads, width=24)
    assert objective.num_splits == heads
    params = list(student.parameters()) + list(objective.parameters())
    optimizer = torch.optim.AdamW(params, lr=3e-3)
    batch = tiny_batch()
    first = None
    for _ in range(40):
        total, terms = _step(teacher, student, objective, batch)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        first = first if first is not None else total.item()
    assert set(terms) == {"emb", "mha", "ffn"}
    assert total.item() < 0.6 * first
    assert all(p.grad is None for p in teacher.parameters())


def test_gradients_reach_student_and_projections_not_teacher():
    teacher, student, objective = _setup()
    total, _ = _step(teacher, student, objective, tiny_batch())
    total.backward()
    assert all(p.grad is not None for p in objective.projections.parameters())
    assert student.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())


def test_only_mapped_teacher_layers_are_tapped():
    teacher, student, objective = _setup()
    assert objective.layer_map == [2, 4]
    request = objective.teacher_request()
    assert request.context_layers == request.hidden_layers == frozenset({2, 4})
    assert not request.cls and not request.logits and not request.attention_layers


def test_weights_scale_terms_and_zero_switches_off():
    teacher, student, objective = _setup(weights={"emb": 2.0, "mha": 0.0})
    total, terms = _step(teacher, student, objective, tiny_batch())
    assert set(terms) == {"emb", "ffn"}
    assert total.item() == pytest.approx(2 * terms["emb"].item() + terms["ffn"].item(), rel=1e-5)
    assert objective.student_request().context_layers == frozenset()


def test_unknown_weight_name_is_named():
    teacher = tiny_teacher()
    with pytest.raises(ValueError, match=r"names \['attn'\], which the 'mlkd' preset does not have"):
        DistillationObjective(LossesSpec(weights={"attn": 1.0}), teacher.config, teacher.config)


def test_mha_splits_must_divide_both_widths():
    with pytest.raises(ValueError, match="losses.mha_splits = 5 must divide"):
        _setup(heads=3, width=24, mha_splits=5)
    _, _, objective = _setup(heads=3, width=24, mha_splits=6)
    assert objective.num_splits == 6


def test_stage2_mlkd_on_a_classifier():
    teacher, student, objective = _setup(stage=2, with_head=True, heads=4, width=24)
    labels = torch.tensor([0, 1, 0, 2])
    total, terms = _step(teacher, student, objective, tiny_batch(), labels)
    assert set(terms) == {"ss", "sc", "kd"}
    total.backward()
    used = [p.weight.requires_grad for p in objective.projections]
    assert used == [False, True], "stage 2 trains only the last W_h (for L_SC)"
    assert student.classifier.weight.grad.abs().sum() > 0


def test_stage2_regression_uses_mse_and_drops_contrast():
    teacher = tiny_teacher(with_head=True, num_labels=1)
    student = build_student(teacher, StudentSpec(num_layers=2, hidden_size=24, num_heads=2, intermediate_size=40), [2, 4])
    objective = DistillationObjective(LossesSpec(), teacher.config, student.config, stage=2, regression=True)
    total, terms = _step(teacher, student, objective, tiny_batch(), torch.tensor([0.5, 1.0, 4.2, 3.3]))
    assert set(terms) == {"ss", "kd"}
    binned = DistillationObjective(
        LossesSpec(regression_contrastive="bins"), teacher.config, student.config, stage=2, regression=True
    )
    _, terms = _step(teacher, student, binned, tiny_batch(), torch.tensor([0.5, 1.0, 4.2, 3.3]))
    assert set(terms) == {"ss", "sc", "kd"}


@pytest.mark.parametrize(
    "preset,stage,expected",
    [
        ("tinybert", 1, {"emb", "attn", "hidden"}),
        ("tinybert", 2, {"kd"}),
        ("minilmv2", 1, {"qq", "kk", "vv"}),
        ("distilbert", 2, {"kd", "cos"}),
    ],
)
def test_comparison_presets_run_and_backpropagate(preset, stage, expected):
    heads = 12 if preset == "tinybert" else 4
    kw = {"relation_heads": 12} if preset == "minilmv2" else {}
    teacher, student, objective = _setup(preset, stage, heads=heads, width=24, with_head=stage == 2, **kw)
    total, terms = _step(teacher, student, objective, tiny_batch())
    assert set(terms) == expected and torch.isfinite(total)
    assert student.config._attn_implementation == teacher.config._attn_implementation == "sdpa"
    total.backward()


def test_tinybert_requests_scores_of_the_mapped_layers_only_and_shares_one_projection():
    _, _, objective = _setup("tinybert", heads=12)
    t, s = objective.teacher_request(), objective.student_request()
    assert t.attention_scores_layers == t.hidden_layers == frozenset({2, 4}) and not t.attention_layers
    assert s.attention_scores_layers == frozenset({1, 2})
    assert len(objective.projections) == 1, "TinyBERT's one fit_dense by default"
    _, _, per_layer = _setup("tinybert", heads=12, projection="per_layer")
    assert len(per_layer.projections) == 3


def test_tinybert_attention_needs_equal_heads():
    teacher = tiny_teacher()
    student = build_student(teacher, StudentSpec(num_layers=2, hidden_size=24, num_heads=4, intermediate_size=40), [2, 4])
    with pytest.raises(ValueError, match="needs equal head counts"):
        DistillationObjective(LossesSpec(preset="tinybert"), teacher.config, student.config)


def test_bf16_models_give_fp32_losses_close_to_fp32_models():
    teacher, student, objective = _setup()
    batch = tiny_batch()
    total32, _ = _step(teacher, student, objective, batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total16, terms16 = _step(teacher, student, objective, batch)
    assert all(v.dtype == torch.float32 for v in terms16.values())
    assert total16.item() == pytest.approx(total32.item(), rel=0.05)


@pytest.mark.parametrize("mode", ["objective", "all"])
def test_compiled_step_matches_eager(mode):
    """train.compile gives the eager loss terms and gradients (padding included), state-dict keys kept."""
    from mlkd_scale.models.distillation_module import MODEL_INPUTS, DistillationModule, compile_for_speed

    teacher, student, objective = _setup()
    teacher.eval(), student.eval()  # no dropout: both runs see the same forward
    module = DistillationModule(student, objective)
    keys = list(module.state_dict())
    batch = {k: v for k, v in tiny_batch().items() if k in MODEL_INPUTS}

    def run():
        module.zero_grad()
        with torch.no_grad(), FeatureTap(teacher, objective.teacher_request()) as tap:
            features = tap(**batch)
        total, terms = module(batch, features)
        total.backward()
        return terms, {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}

    eager_terms, eager_grads = run()
    compile_for_speed(mode, teacher, module, "replicate")
    terms, grads = run()
    assert list(module.state_dict()) == keys
    for name, value in eager_terms.items():
        torch.testing.assert_close(terms[name], value, rtol=1e-4, atol=1e-6)
    assert eager_grads.keys() <= grads.keys()
    for name, grad in grads.items():  # a compiled student also returns zeros for the unused pooler
        expected = eager_grads.get(name, torch.zeros_like(grad))
        torch.testing.assert_close(grad, expected, rtol=1e-3, atol=1e-5)


def test_identity_projection_init_keeps_a_teacher_initialised_student_at_zero_ffn_loss():
    """projection_init 'identity': W_h = I, b = 0, so a student copied from the mapped teacher layers
    starts with L_FFN = Σ_n MSE(H^S_n I, H^T_{g(n)}) = 0; a random W_h does not."""
    teacher = tiny_teacher()
    spec = StudentSpec(num_layers=2, hidden_size=48, num_heads=4, intermediate_size=64, init="teacher_layers")
    student = build_student(teacher, spec, [2, 4])
    student.eval()
    batch = tiny_batch()
    for init, zero in (("identity", True), ("random", False)):
        losses = LossesSpec(preset="mlkd", projection_init=init, weights={"emb": 0, "mha": 0})
        objective = DistillationObjective(losses, teacher.config, student.config, 1)
        if init == "identity":
            assert all(torch.equal(p.weight, torch.eye(48)) and not p.bias.any() for p in objective.projections)
        # a 4-head student copied from a 12-head teacher computes other hidden states than the teacher,
        # so compare with the student itself as the teacher of its own layers (same heads)
        own = DistillationObjective(losses.model_copy(update={"layer_mapping": [1, 2]}), student.config,
                                    student.config, 1)
        _, terms = _step(student, student, own, batch)
        assert (terms["ffn"].item() == pytest.approx(0.0, abs=1e-10)) is zero


def test_identity_projection_init_needs_equal_widths():
    teacher, student, _ = _setup(width=24)
    with pytest.raises(ValueError, match="projection_init.*width"):
        DistillationObjective(LossesSpec(projection_init="identity"), teacher.config, student.config, 1)
