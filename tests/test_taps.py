"""Feature taps on stock HF BERT models: right tensors, only what was asked, hooks removed."""

import pytest
import torch
from tiny_models import tiny_batch, tiny_teacher

from mlkd_scale.models import FeatureTap, TapRequest


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


def test_qkv_and_attention_maps_need_eager_only_for_attention():
    model = tiny_teacher()
    with pytest.raises(ValueError, match="set_attn_implementation"):
        FeatureTap(model, TapRequest(attention_layers=frozenset({1})))
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad(), FeatureTap(model, TapRequest(qkv_layers=frozenset({3}))) as tap:
        q, k, v = tap(**tiny_batch()).qkv[3]
    assert q.shape == k.shape == v.shape == (4, 12, 48)
    model.set_attn_implementation("eager")
    with torch.no_grad(), FeatureTap(model, TapRequest(attention_layers=frozenset({2}))) as tap:
        probs = tap(**tiny_batch()).attentions[2]
    assert probs.shape == (4, 12, 12, 12)
    torch.testing.assert_close(probs.sum(-1), torch.ones(4, 12, 12))


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
