"""How far a student came: agreement of student and teacher sentence similarities on held-out text.

For N held-out sentences, each model embeds every sentence (mean of the last hidden states over
real tokens); the N(N−1)/2 pairwise cosine similarities of the student are compared with the
teacher's by Spearman rank correlation. 1.0 means the student orders sentence pairs exactly as the
teacher does. An untrained student of the same architecture gives the baseline.
"""

from __future__ import annotations

import torch
from scipy.stats import spearmanr
from transformers import AutoModel, AutoTokenizer, PreTrainedModel


@torch.no_grad()
def sentence_embeddings(model: PreTrainedModel, tokenizer, sentences: list[str], max_length: int = 128,
                        batch_size: int = 64) -> torch.Tensor:
    """[N, d] mean-pooled last hidden states (fp32), padding excluded."""
    model.eval()
    max_length = min(max_length, model.config.max_position_embeddings)
    out = []
    for start in range(0, len(sentences), batch_size):
        batch = tokenizer(sentences[start:start + batch_size], padding=True, truncation=True,
                          max_length=max_length, return_tensors="pt")
        hidden = model(**batch).last_hidden_state.float()
        mask = batch["attention_mask"][..., None].float()
        out.append((hidden * mask).sum(1) / mask.sum(1))
    return torch.cat(out)


def pairwise_cosines(embeddings: torch.Tensor) -> torch.Tensor:
    """The upper triangle (i < j) of the cosine-similarity matrix, flattened."""
    normed = torch.nn.functional.normalize(embeddings, dim=-1)
    sims = normed @ normed.T
    i, j = torch.triu_indices(len(sims), len(sims), offset=1)
    return sims[i, j]


def similarity_agreement(teacher_embeddings: torch.Tensor, student_embeddings: torch.Tensor) -> float:
    """Spearman correlation of the two models' pairwise sentence similarities."""
    return float(spearmanr(pairwise_cosines(teacher_embeddings), pairwise_cosines(student_embeddings)).statistic)


def agreement_report(teacher_dir: str, student_dir: str, sentences: list[str], seed: int = 0) -> dict[str, float]:
    """Agreement of the trained student and of an untrained one (same config, seeded random init)."""
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    teacher = AutoModel.from_pretrained(teacher_dir, dtype=torch.float32)
    student = AutoModel.from_pretrained(student_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    untrained = AutoModel.from_config(student.config)
    reference = sentence_embeddings(teacher, tokenizer, sentences)
    return {
        "sentences": len(sentences),
        "trained": similarity_agreement(reference, sentence_embeddings(student, tokenizer, sentences)),
        "untrained": similarity_agreement(reference, sentence_embeddings(untrained, tokenizer, sentences)),
    }
