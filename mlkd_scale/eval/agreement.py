"""How far a student came: agreement of student and teacher sentence similarities on held-out text.

For N held-out sentences, each model embeds every sentence (mean of the last hidden states over
real tokens); the N(N−1)/2 pairwise cosine similarities of the student are compared with the
teacher's by Spearman rank correlation. 1.0 means the student orders sentence pairs exactly as the
teacher does.

A student has learnt something *contextual* only if it beats the references that have no context
at all, scored the same way against the same teacher:

* ``untrained`` — a student of the same architecture with fresh random weights (seeded);
* ``teacher_embeddings`` — the teacher's own embedding layer (word + position + type embeddings,
  LayerNorm), mean-pooled: the teacher's lexical knowledge without a single attention layer;
* ``tfidf`` — a bag of words: TF-IDF vectors of the lower-cased word tokens (idf fitted on the
  held-out sentences themselves, smoothed as scikit-learn does: ln((1+N)/(1+df)) + 1).
"""

from __future__ import annotations

import re

import torch
from scipy.stats import spearmanr
from transformers import AutoModel, AutoTokenizer, PreTrainedModel

_WORD = re.compile(r"(?u)\b\w\w+\b")  # scikit-learn's default token pattern


def _batches(tokenizer, sentences: list[str], max_length: int, batch_size: int):
    for start in range(0, len(sentences), batch_size):
        yield tokenizer(sentences[start:start + batch_size], padding=True, truncation=True,
                        max_length=max_length, return_tensors="pt")


def _mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    mask = attention_mask[..., None].float()
    return (hidden.float() * mask).sum(1) / mask.sum(1)


@torch.no_grad()
def sentence_embeddings(model: PreTrainedModel, tokenizer, sentences: list[str], max_length: int = 128,
                        batch_size: int = 64) -> torch.Tensor:
    """[N, d] mean-pooled last hidden states (fp32), padding excluded."""
    model.eval()
    max_length = min(max_length, model.config.max_position_embeddings)
    return torch.cat([
        _mean_pool(model(**batch).last_hidden_state, batch["attention_mask"])
        for batch in _batches(tokenizer, sentences, max_length, batch_size)
    ])


@torch.no_grad()
def embedding_layer_embeddings(model: PreTrainedModel, tokenizer, sentences: list[str], max_length: int = 128,
                               batch_size: int = 64) -> torch.Tensor:
    """[N, d] mean-pooled outputs of the model's embedding layer alone (no attention, no FFN)."""
    model.eval()
    embeddings = model.base_model.embeddings
    max_length = min(max_length, model.config.max_position_embeddings)
    return torch.cat([
        _mean_pool(
            embeddings(input_ids=batch["input_ids"], token_type_ids=batch.get("token_type_ids")),
            batch["attention_mask"],
        )
        for batch in _batches(tokenizer, sentences, max_length, batch_size)
    ])


def tfidf_embeddings(sentences: list[str]) -> torch.Tensor:
    """[N, V] TF-IDF vectors of the sentences' lower-cased words (idf smoothed, rows L2-normalised)."""
    docs = [_WORD.findall(s.lower()) for s in sentences]
    vocab = {w: i for i, w in enumerate(sorted({w for d in docs for w in d}))}
    counts = torch.zeros(len(docs), max(len(vocab), 1))
    for row, words in enumerate(docs):
        for word in words:
            counts[row, vocab[word]] += 1
    df = (counts > 0).sum(0).float()
    idf = torch.log((1 + len(docs)) / (1 + df)) + 1
    return torch.nn.functional.normalize(counts * idf, dim=-1)


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
    """Agreement with the teacher of the trained student and of every context-free reference."""
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    teacher = AutoModel.from_pretrained(teacher_dir, dtype=torch.float32)
    student = AutoModel.from_pretrained(student_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    untrained = AutoModel.from_config(student.config)
    reference = sentence_embeddings(teacher, tokenizer, sentences)
    baselines = {
        "untrained": sentence_embeddings(untrained, tokenizer, sentences),
        "teacher_embeddings": embedding_layer_embeddings(teacher, tokenizer, sentences),
        "tfidf": tfidf_embeddings(sentences),
    }
    report = {"sentences": len(sentences),
              "trained": similarity_agreement(reference, sentence_embeddings(student, tokenizer, sentences))}
    report.update({name: similarity_agreement(reference, emb) for name, emb in baselines.items()})
    report["best_baseline"] = max(baselines, key=report.get)
    report["margin"] = report["trained"] - report[report["best_baseline"]]
    return report


BASELINE_LABELS = {
    "untrained": "untrained student (same shape, random weights)",
    "teacher_embeddings": "teacher's embedding layer, mean-pooled (no attention)",
    "tfidf": "TF-IDF bag of words",
}


def format_report(report: dict) -> str:
    """The report as the ``mlkd-scale agreement`` command prints it."""
    lines = [
        "agreement with the teacher (Spearman of pairwise sentence similarities, "
        + f"{report['sentences']} held-out sentences):",
        f"  {'trained student':<56} {report['trained']:.3f}",
    ]
    lines += [f"  {label:<56} {report[name]:.3f}" for name, label in BASELINE_LABELS.items()]
    lines.append(f"  margin over the best baseline ({report['best_baseline']}): {report['margin']:+.3f}")
    return "\n".join(lines)
