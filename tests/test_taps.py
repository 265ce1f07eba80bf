"""Feature taps on stock HF BERT models: right tensors, only what was asked, hooks removed."""

import pytest
import torch
from tiny_models import tiny_batch, tiny_teacher

from mlkd_scale.models import FeatureTap, TapRequest
from mlkd_scale.models.selective_attention import SELECTIVE_ATTENTION


def test_taps_match_the_models_own_outputs():
    model = tiny_teacher(with_head=True)
    batch = tiny_batch()
    request = TapRequest(
        embeddings=True, context_layers=frozenset({2}), hidden_layers=frozenset({1, 4}), cls=True, logits=True
    )
    with torch.no_grad(), FeatureTap(model, request) as tap:
        feats = tap(**batch)
        ref = model(**batch, output_hidden_states=True)
    torch.testing.assert_close(feats.embeddings, ref.hidden_states[0])
    torch.testing.assert_close(feats.hidden[1], ref.hidden_states[1])
    torch.testing.assert_close(feats.hidden[4], ref.hidden_states[4])
    torch.testing.assert_close(feats.cls, ref.hidden_states[4][:, 0])
    torch.testing.assert_close(feats.logits, ref.logits)
    assert set(feats.context) == {2} and set(feats.hidden) == {1, 4}


def test_context_is_the_concatenated_head_output_before_the_output_projection():
    model = tiny_teacher()
    batch = tiny_batch()
    with torch.no_grad(), FeatureTap(model, TapRequest(context_layers=frozenset({1}), hidden_layers=frozenset())) as tap:
        ctx = tap(**batch).context[1]
        # Recompute softmax(QKᵀ/√dk)V per head by hand from the layer's input (the embedding output).
        attn = model.encoder.layer[0].attention.self
        x = model.embeddings(input_ids=batch["input_ids"])
        heads, dk = attn.num_attention_heads, attn.attention_head_size
        q, k, v = (p(x).view(*x.shape[:2], heads, dk).transpose(1, 2) for p in (attn.query, attn.key, attn.value))
        bias = (1 - batch["attention_mask"][:, None, None, :].float()) * -1e9
        probs = torch.softmax(q @ k.transpose(-1, -2) / dk**0.5 + bias, dim=-1)
        expected = (probs @ v).transpose(1, 2).reshape(x.shape)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(ctx[real], expected[real], rtol=1e-4, atol=1e-5)
    assert ctx.shape == (4, 12, 48)


def test_qkv_taps_keep_sdpa():
    model = tiny_teacher()
    with torch.no_grad(), FeatureTap(model, TapRequest(qkv_layers=frozenset({3}))) as tap:
        q, k, v = tap(**tiny_batch()).qkv[3]
    assert q.shape == k.shape == v.shape == (4, 12, 48)
    assert model.config._attn_implementation == "sdpa"


def _every_layer_attention(model):
    """Each layer's self-attention weights output (None where the layer ran SDPA)."""
    seen = {}
    handles = [
        layer.attention.self.register_forward_hook(lambda _m, _a, out, n=n: seen.__setitem__(n, out[1]))
        for n, layer in enumerate(model.encoder.layer, start=1)
    ]
    return seen, handles


def tapped_layer_2_beside_eager(model, reference, batch):
    """Features of ``model`` tapped for layer 2's attention maps and layer 4's states, and ``reference``'s
    eager outputs; asserts that only layer 2 computed maps (the others ran SDPA)."""
    reference.set_attn_implementation("eager")
    seen, handles = _every_layer_attention(model)
    request = TapRequest(attention_layers=frozenset({2}), hidden_layers=frozenset({4}))
    with torch.no_grad(), FeatureTap(model, request) as tap:
        assert model.config._attn_implementation == SELECTIVE_ATTENTION
        feats = tap(**batch)
        ref = reference(**batch, output_attentions=True, output_hidden_states=True)
    for handle in handles:
        handle.remove()
    assert [n for n, weights in sorted(seen.items()) if weights is not None] == [2]
    return feats, ref


def test_attention_maps_only_in_requested_layers_equal_eager_ones():
    """An SDPA model gives eager's probabilities in the tapped layer; the other layers stay SDPA."""
    model = tiny_teacher()
    feats, ref = tapped_layer_2_beside_eager(model, tiny_teacher(), tiny_batch())
    torch.testing.assert_close(feats.attentions[2], ref.attentions[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(feats.hidden[4], ref.hidden_states[4], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(feats.attentions[2].sum(-1), torch.ones(4, 12, 12))
    assert model.config._attn_implementation == "sdpa", "removing the tap restores the implementation"
    assert not any(hasattr(m, "mlkd_returns_attention_map") for m in model.modules())


def test_tapped_attention_maps_train_like_eager_ones():
    """Gradients through the tapped maps (TinyBERT's student) equal eager attention's, dropout off."""
    model, reference = tiny_teacher(), tiny_teacher()
    reference.set_attn_implementation("eager")
    batch = tiny_batch()
    layers = frozenset({1, 3})
    request = TapRequest(attention_layers=layers, hidden_layers=frozenset({4}))
    with FeatureTap(model.requires_grad_(True), request) as tap:
        feats = tap(**batch)
        (sum(feats.attentions[n].square().sum() for n in layers) + feats.hidden[4].sum()).backward()
    out = reference.requires_grad_(True)(**batch, output_attentions=True)
    (sum(out.attentions[n - 1].square().sum() for n in layers) + out.last_hidden_state.sum()).backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_attention_maps_refuse_an_implementation_they_cannot_mask():
    model = tiny_teacher()
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        FeatureTap(model, TapRequest(attention_layers=frozenset({1})))
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0


def test_hooks_are_removed_and_nothing_unrequested_is_kept():
    model = tiny_teacher()
    modules = list(model.modules())
    before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in modules)
    tap = FeatureTap(model, TapRequest(embeddings=True, hidden_layers=frozenset({2})))
    with torch.no_grad():
        feats = tap(**tiny_batch())
    assert feats.context == {} and feats.qkv == {} and feats.cls is None and feats.logits is None
    assert tap._store == {}, "the tap must not hold tensors between forwards"
    tap.remove()
    after = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in modules)
    assert after == before


def test_bad_requests_are_clear():
    model = tiny_teacher()
    with pytest.raises(ValueError, match=r"layers \[5\] requested from a model with 4 layers"):
        FeatureTap(model, TapRequest(hidden_layers=frozenset({5})))
    with pytest.raises(ValueError, match="no prediction head"):
        with torch.no_grad(), FeatureTap(model, TapRequest(logits=True)) as tap:
            tap(**tiny_batch())
    with pytest.raises(TypeError, match="BERT layout"):
        FeatureTap(torch.nn.Linear(2, 2), TapRequest())


def test_attention_maps_refuse_a_model_that_cannot_switch(monkeypatch):
    model = tiny_teacher()
    monkeypatch.setattr(model, "set_attn_implementation", lambda _name: None)  # what HF does: warn, keep
    with pytest.raises(ValueError, match="cannot switch its attention implementation"):
        FeatureTap(model, TapRequest(attention_layers=frozenset({1})))
    assert not any(hasattr(m, "mlkd_returns_attention_map") for m in model.modules())
