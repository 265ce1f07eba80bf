"""Held-out agreement with the teacher, and the context-free references a student must beat."""

import math

import pytest
import torch
from run_fixtures import make_teacher
from scipy.stats import spearmanr

from mlkd_scale import cli
from mlkd_scale.eval.agreement import (
    agreement_report,
    embedding_layer_embeddings,
    format_report,
    pairwise_cosines,
    tfidf_embeddings,
)

SENTENCES = [
    "the cat sat on the mat near the door",
    "a dog sat on the mat by the door",
    "stocks fell sharply as markets opened",
    "the market opened and stocks fell",
    "the cat and the dog are friends",
]


def test_tfidf_is_the_smoothed_textbook_formula():
    """tf·idf with idf = ln((1+N)/(1+df)) + 1, rows L2-normalised (scikit-learn's defaults)."""
    sklearn = pytest.importorskip("sklearn.feature_extraction.text")
    ours = tfidf_embeddings(SENTENCES)
    theirs = torch.tensor(sklearn.TfidfVectorizer().fit_transform(SENTENCES).toarray(), dtype=torch.float32)
    assert torch.allclose(ours, theirs, atol=1e-6)
    # written out for one word: "cat" occurs in sentences 0 and 4 (df = 2) of N = 5
    vocab = sorted({w for s in SENTENCES for w in s.split() if len(w) > 1})
    raw = ours[0] / ours[0][vocab.index("the")]  # "the": tf 3 in sentence 0, df 4
    idf = lambda df: math.log(6 / (1 + df)) + 1
    assert raw[vocab.index("cat")].item() == pytest.approx(1 * idf(2) / (3 * idf(4)), rel=1e-5)


def test_embedding_layer_baseline_is_the_embedding_output_mean_pooled(tmp_path):
    from transformers import AutoModel, AutoTokenizer

    teacher_dir = make_teacher(tmp_path / "teacher")
    model = AutoModel.from_pretrained(teacher_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    got = embedding_layer_embeddings(model, tokenizer, SENTENCES[:2])
    batch = tokenizer(SENTENCES[:2], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch, output_hidden_states=True).hidden_states[0]  # the embedding layer's output
    mask = batch["attention_mask"][..., None].float()
    assert torch.allclose(got, (hidden * mask).sum(1) / mask.sum(1), atol=1e-5)


def test_report_scores_every_baseline_and_the_teacher_agrees_with_itself(tmp_path, capsys):
    teacher_dir = make_teacher(tmp_path / "teacher")
    report = agreement_report(teacher_dir, teacher_dir, SENTENCES)
    assert report["trained"] == pytest.approx(1.0)
    for name in ("untrained", "teacher_embeddings", "tfidf"):
        assert -1.0 <= report[name] <= 1.0
    best = max(report[n] for n in ("untrained", "teacher_embeddings", "tfidf"))
    assert report["margin"] == pytest.approx(1.0 - best)
    text = format_report(report)
    assert "TF-IDF" in text and "embedding layer" in text and "untrained" in text
    # the spearman of the pairwise cosines, as the module docstring defines it
    emb = tfidf_embeddings(SENTENCES)
    assert spearmanr(pairwise_cosines(emb), pairwise_cosines(emb)).statistic == pytest.approx(1.0)


def test_agreement_command_prints_the_baselines(tmp_path, capsys):
    import json

    teacher_dir = make_teacher(tmp_path / "teacher")
    heldout = tmp_path / "heldout.jsonl"
    text = " ".join(s.capitalize() + " and this makes the sentence long enough." for s in SENTENCES)
    heldout.write_text(json.dumps({"id": "x", "text": text}) + "\n")
    cli.agreement(teacher_dir, teacher_dir, str(heldout))
    out = capsys.readouterr().out
    assert "trained student" in out and "TF-IDF bag of words" in out and "margin over the best baseline" in out
