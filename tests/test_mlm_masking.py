"""MLM corruption of packed batches: DistilBERT's 15 % pick and 80/10/10 split, seeded per micro batch."""

import pytest
import torch
from transformers import BertTokenizerFast

from mlkd_scale.data.corpus.mlm_masking import IGNORE_INDEX, BatchMasker, mask_tokens, masking_generator

CLS, SEP, PAD, MASK, VOCAB = 1, 2, 0, 3, 1000
SPECIAL = [PAD, CLS, SEP, MASK]


def packed_batch(batch=64, length=128, seed=0):
    """[CLS] body [SEP] rows with a [SEP] between documents inside the body, as packing makes them."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, VOCAB, (batch, length), generator=g)
    ids[:, 0], ids[:, -1] = CLS, SEP
    ids[:, length // 3], ids[:, 2 * length // 3] = SEP, SEP
    return ids


def test_picks_fifteen_percent_of_the_ordinary_tokens_and_splits_them_80_10_10():
    ids = packed_batch(batch=256)
    corrupted, labels = mask_tokens(ids, SPECIAL, MASK, VOCAB, masking_generator(1, 0, 1, 0))
    ordinary = ~torch.isin(ids, torch.tensor(SPECIAL))
    picked = labels != IGNORE_INDEX
    assert int(picked.sum()) == -(-15 * int(ordinary.sum()) // 100)  # ceil(0.15 x candidates)
    assert not (picked & ~ordinary).any(), "a special token was picked"
    assert torch.equal(labels[picked], ids[picked])
    assert torch.equal(corrupted[~picked], ids[~picked]), "an unpicked token changed"
    n = int(picked.sum())
    masked = (corrupted[picked] == MASK).float().sum() / n
    kept = (corrupted[picked] == ids[picked]).float().sum() / n
    assert masked == pytest.approx(0.8, abs=0.02)
    assert kept == pytest.approx(0.1 + 0.1 / VOCAB, abs=0.015)  # kept, or replaced by itself
    assert 1 - masked - kept == pytest.approx(0.1, abs=0.015)
    assert 0 <= int(corrupted.min()) and int(corrupted.max()) < VOCAB
    per_row = picked.sum(1).float() / ordinary.sum(1)
    assert per_row.mean() == pytest.approx(0.15, abs=0.005) and per_row.std() < 0.06  # spread over rows


def test_same_seed_step_and_micro_batch_give_the_same_masks_and_others_do_not():
    ids = packed_batch(batch=8, length=64)
    first = mask_tokens(ids, SPECIAL, MASK, VOCAB, masking_generator(7, 0, 3, 1))
    again = mask_tokens(ids, SPECIAL, MASK, VOCAB, masking_generator(7, 0, 3, 1))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    for other in [(8, 0, 3, 1), (7, 1, 3, 1), (7, 0, 4, 1), (7, 0, 3, 0)]:
        labels = mask_tokens(ids, SPECIAL, MASK, VOCAB, masking_generator(*other))[1]
        assert not torch.equal(labels, first[1]), other
    assert torch.equal(ids, packed_batch(batch=8, length=64)), "the input was modified"


def test_masking_does_not_depend_on_the_global_random_state():
    ids = packed_batch(batch=4, length=32)
    torch.manual_seed(0)
    first = mask_tokens(ids, SPECIAL, MASK, VOCAB, masking_generator(1, 0, 1, 0))[0]
    torch.manual_seed(123)
    torch.rand(10)
    assert torch.equal(first, mask_tokens(ids, SPECIAL, MASK, VOCAB, masking_generator(1, 0, 1, 0))[0])


def test_bad_probability_is_refused():
    with pytest.raises(ValueError, match=r"in \(0, 1\)"):
        mask_tokens(packed_batch(2, 16), SPECIAL, MASK, VOCAB, torch.Generator(), probability=1.0)


def test_batch_masker_takes_the_tokenizers_special_and_mask_ids(tmp_path):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *[f"w{i}" for i in range(60)]]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"))
    masker = BatchMasker(tokenizer, len(vocab), 0.5, seed=1, rank=0)
    ids = torch.randint(5, len(vocab), (4, 32))
    ids[:, 0], ids[:, -1] = tokenizer.cls_token_id, tokenizer.sep_token_id
    corrupted, labels = masker(ids, step=1, micro_batch=0)
    assert (labels[:, [0, -1]] == IGNORE_INDEX).all()
    assert (corrupted == tokenizer.mask_token_id).sum() > 0
    tokenizer.mask_token = None
    with pytest.raises(ValueError, match="no mask token"):
        BatchMasker(tokenizer, len(vocab), 0.15, seed=1, rank=0)
