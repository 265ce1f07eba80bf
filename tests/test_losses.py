"""Each loss against a loop-by-loop reference, plus the properties the method relies on."""

import pytest
import reference_losses as ref
import torch

from mlkd_scale.losses import (
    embedding_relation_loss,
    hidden_mse_loss,
    mha_relation_loss,
    prediction_kd_loss,
    relation,
    sample_contrastive_loss,
    sample_similarity_loss,
)

B, L, DT, DS = 3, 7, 24, 12


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(B, L, DT, generator=g)
    s = torch.randn(B, L, DS, generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 5:] = 0  # padding in two sequences of different lengths
    mask[2, 3:] = 0
    return t, s, mask


def test_embedding_relation_matches_reference(batch):
    t, s, mask = batch
    got = embedding_relation_loss(t, s, mask)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(ref.relation(t, s, mask, 1), rel=1e-4)


@pytest.mark.parametrize("splits", [1, 3, 4])
def test_mha_relation_matches_reference(batch, splits):
    t, s, mask = batch
    got = mha_relation_loss(t, s, mask, splits)
    assert got.item() == pytest.approx(ref.relation(t, s, mask, splits), rel=1e-4)


def test_relation_without_mask_uses_every_token(batch):
    t, s, _ = batch
    assert embedding_relation_loss(t, s, None).item() == pytest.approx(ref.relation(t, s, None, 1), rel=1e-4)


def test_hidden_mse_matches_reference(batch):
    t, _, mask = batch
    s = torch.randn_like(t)
    assert hidden_mse_loss(t, s, mask).item() == pytest.approx(ref.hidden_mse(t, s, mask), rel=1e-5)


def test_sample_similarity_matches_reference():
    g = torch.Generator().manual_seed(1)
    t, s = torch.randn(6, DT, generator=g), torch.randn(6, DS, generator=g)
    assert sample_similarity_loss(t, s).item() == pytest.approx(ref.sample_similarity(t, s), rel=1e-4)


@pytest.mark.parametrize("labels", [[0, 1, 0, 2, 1, 1], [0, 0, 0, 0, 0, 0], [0, 1, 2, 3, 4, 5]])
def test_sample_contrastive_matches_reference(labels):
    g = torch.Generator().manual_seed(2)
    t, s = torch.randn(6, DT, generator=g), torch.randn(6, DT, generator=g)
    labels = torch.tensor(labels)
    got = sample_contrastive_loss(t, s, labels, temperature=0.2)
    assert got.item() == pytest.approx(ref.contrastive(*ref.to_float64(t, s), labels, 0.2), rel=1e-4)


@pytest.mark.parametrize("tau", [1.0, 2.0, 4.0])
def test_prediction_kd_matches_reference(tau):
    g = torch.Generator().manual_seed(3)
    t, s = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    assert prediction_kd_loss(t, s, tau).item() == pytest.approx(ref.prediction_kd(t, s, tau), rel=1e-4)


def test_relations_vanish_for_a_student_identical_to_the_teacher(batch):
    t, _, mask = batch
    assert embedding_relation_loss(t, t.clone(), mask).item() == pytest.approx(0.0, abs=1e-6)
    assert mha_relation_loss(t, t.clone(), mask, 4).item() == pytest.approx(0.0, abs=1e-6)
    assert sample_similarity_loss(t[:, 0], t[:, 0].clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert prediction_kd_loss(t[:, 0], t[:, 0].clone(), 2.0).item() == pytest.approx(0.0, abs=1e-6)
    assert hidden_mse_loss(t, t.clone(), mask).item() == 0.0


def test_split_count_must_divide_both_widths(batch):
    """A teacher split of 8 dims and a student split of 4 dims still compare as L×L relations."""
    t, s, mask = batch
    assert torch.isfinite(mha_relation_loss(t, s, mask, 3))
    with pytest.raises(ValueError, match="cannot be cut into 5 equal splits"):
        mha_relation_loss(t, s, mask, 5)


def test_padding_content_does_not_change_any_token_loss(batch):
    t, s, mask = batch
    t2, s2 = t.clone(), s.clone()
    pad = mask == 0
    t2[pad] = torch.randn(int(pad.sum()), DT) * 100
    s2[pad] = torch.randn(int(pad.sum()), DS) * 100
    s_proj = torch.randn_like(t)
    s_proj2 = s_proj.clone()
    s_proj2[pad] = 1e3
    for f in (
        lambda a, b: embedding_relation_loss(a, b, mask),
        lambda a, b: mha_relation_loss(a, b, mask, 3),
    ):
        assert f(t2, s2).item() == pytest.approx(f(t, s).item(), rel=1e-6)
    assert hidden_mse_loss(t2, s_proj2, mask).item() == pytest.approx(hidden_mse_loss(t, s_proj, mask).item())


def test_gradients_reach_the_student_never_the_teacher(batch):
    t, s, mask = batch
    t = t.clone().requires_grad_(True)
    s = s.clone().requires_grad_(True)
    cls_t, cls_s = t[:, 0], s[:, 0]
    labels = torch.tensor([0, 1, 0])
    total = (
        embedding_relation_loss(t, s, mask)
        + mha_relation_loss(t, s, mask, 3)
        + sample_similarity_loss(cls_t, cls_s)
        + sample_contrastive_loss(cls_t[:, :DS], cls_s, labels)
        + prediction_kd_loss(cls_t[:, :4], cls_s[:, :4])
        + hidden_mse_loss(t[..., :DS], s, mask)
    )
    total.backward()
    assert t.grad is None
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert torch.all(s.grad[mask == 0] == 0), "padded positions must not receive gradient"


def relation_kl_float64(t, s, mask, splits):
    """The textbook L_MHA in float64: mean over real rows and splits of Σ_j p_j (log p_j − log q_j)."""
    batch, length = s.shape[:2]

    def log_relation(x):
        xs = x.double().reshape(batch, length, splits, -1).transpose(1, 2)
        logits = xs @ xs.transpose(-1, -2) / xs.shape[-1] ** 0.5
        if mask is not None:
            logits = logits.masked_fill(mask[:, None, None, :] == 0, -1e18)
        return torch.log_softmax(logits, dim=-1)

    log_p, log_q = log_relation(t), log_relation(s)
    rows = (mask if mask is not None else torch.ones(batch, length)).double()[:, None, :]
    per_row = (log_p.exp() * (log_p - log_q)).sum(-1)
    return (per_row * rows).sum() / (rows.sum() * splits)


@pytest.mark.parametrize("rows_per_chunk", [None, 2])
@pytest.mark.parametrize("masked", [True, False])
def test_relation_gradient_equals_autograd_of_the_plain_formula(batch, masked, rows_per_chunk, monkeypatch):
    """The relation KL's value and hand-written gradient against autograd of the textbook formula, in
    float64: all B·A = 9 relations in one chunk, and in chunks of 2 (the last one shorter)."""
    if rows_per_chunk:
        monkeypatch.setitem(relation.CHUNK_BYTES, "cpu", rows_per_chunk * 4 * L * L)
    t, s, mask = batch
    mask = mask if masked else None
    s = s.clone().requires_grad_(True)
    loss = mha_relation_loss(t, s, mask, 3)
    loss.backward()
    s64 = s.detach().double().requires_grad_(True)
    reference = relation_kl_float64(t, s64, mask, 3)
    reference.backward()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("masked", [True, False])
def test_relation_keeps_its_precision_near_convergence(masked):
    """A student whose relations nearly equal the teacher's (KL ≈ 2·10⁻⁶ per row, where training ends
    up) with large logits (≈ 36 on the diagonal): the fp32 KL stays within 1 % of float64. Each row's
    log-sum-exp is ≈ 36 there, where fp32 rounds by ≈ 2·10⁻⁶: the gap between the teacher's and the
    student's must be taken before anything of that size is rounded, or the KL is lost in it."""
    g = torch.Generator().manual_seed(0)
    t = 3 * torch.randn(2, 64, 48, generator=g)
    s = t + 0.003 * torch.randn(t.shape, generator=g)
    mask = torch.ones(2, 64, dtype=torch.long)
    mask[1, 40:] = 0
    mask = mask if masked else None
    reference = relation_kl_float64(t, s, mask, 3).item()
    assert 1e-6 < reference < 1e-5
    assert mha_relation_loss(t, s, mask, 3).item() == pytest.approx(reference, rel=1e-2)


def test_relation_keeps_no_length_squared_buffer_for_the_backward(batch):
    """The relation KL saves only its gradient with respect to the student's split vectors ([B·A, L, d/A],
    the student input's size) for the backward, never an [B·A, L, L] probability buffer."""
    t, s, mask = batch
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.shape) or x, lambda x: x):
        mha_relation_loss(t, s.clone().requires_grad_(True), mask, 3)
    assert saved == [torch.Size([B * 3, L, DS // 3])]


def test_bf16_inputs_give_the_fp32_answer(batch):
    t, s, mask = batch
    t16, s16 = t.bfloat16(), s.bfloat16()
    # Reference: the same bf16-rounded values evaluated in fp32; the loss must not lose precision itself.
    for f in (
        lambda a, b: embedding_relation_loss(a, b, mask),
        lambda a, b: mha_relation_loss(a, b, mask, 3),
        lambda a, b: sample_similarity_loss(a[:, 0], b[:, 0]),
        lambda a, b: prediction_kd_loss(a[:, 0, :4], b[:, 0, :4], 2.0),
        lambda a, b: hidden_mse_loss(a[..., :DS], b, mask),
    ):
        got = f(t16, s16)
        assert got.dtype == torch.float32
        assert got.item() == pytest.approx(f(t16.float(), s16.float()).item(), rel=1e-5)
        assert got.item() == pytest.approx(f(t, s).item(), rel=0.05, abs=1e-3)
