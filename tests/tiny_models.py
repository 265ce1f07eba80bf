"""Tiny random BERT models for fast tests."""

import torch
from transformers import BertConfig, BertForSequenceClassification, BertModel


def tiny_config(hidden=48, layers=4, heads=12, ffn=64, **kw) -> BertConfig:
    return BertConfig(
        vocab_size=120,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=ffn,
        max_position_embeddings=64,
        **kw,
    )


def tiny_teacher(with_head=False, num_labels=3, seed=0, **kw):
    torch.manual_seed(seed)
    config = tiny_config(**kw, num_labels=num_labels) if with_head else tiny_config(**kw)
    model = (BertForSequenceClassification if with_head else BertModel)(config)
    return model.eval().requires_grad_(False)


def tiny_batch(batch=4, length=12, vocab=120, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, length - 4:] = 0
    mask[2, length // 2:] = 0
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask}
