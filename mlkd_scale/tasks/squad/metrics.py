"""The official SQuAD metrics (``evaluate-v1.1.py``, ``evaluate-v2.0.py``), re-implemented.

Reported numbers must be comparable with published ones, so the scoring rules are the official
scripts' rules, including their quirks:

* answers are compared after :func:`normalize_answer` (lower case, ASCII punctuation removed,
  the articles a/an/the removed, whitespace collapsed);
* exact match and token-overlap F1 are taken as the maximum over all gold answers;
* v2.0 only: gold answers that normalize to nothing are dropped, an unanswerable question's only
  gold answer is ``""``, and F1 between token lists of which one is empty is 1 if both are empty,
  else 0 (v1.1 gives 0 whenever nothing overlaps, even two empty strings);
* scores are percentages over all questions, and v2.0 adds the HasAns / NoAns breakdown (each
  only when that group is non-empty, as the official script does).

A question without a prediction scores 0 and still counts in the total (``evaluate-v1.1.py``'s
rule; ``evaluate-v2.0.py`` leaves it out of the total but then fails on the breakdown).

:func:`best_threshold` is ``find_best_thresh`` of the official v2.0 script: the null-score
threshold that maximises F1 (or exact match) on a dev set.
"""

from __future__ import annotations

import logging
import math
import re
import string
from collections import Counter
from collections.abc import Mapping, Sequence

from mlkd_scale.tasks.squad.examples import SquadDataError, SquadExample

log = logging.getLogger("mlkd_scale")

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_answer(s: str) -> str:
    """Lower text and remove punctuation, articles and extra whitespace (the official order)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match(prediction: str, gold: str) -> int:
    """1 if the normalized strings are equal, else 0."""
    return int(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction: str, gold: str, version_2: bool = False) -> float:
    """Token-overlap F1 between normalized answers (bag of tokens, with multiplicity)."""
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    if version_2 and (not pred_tokens or not gold_tokens):
        return float(pred_tokens == gold_tokens)
    common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if common == 0:
        return 0.0
    precision = common / len(pred_tokens)
    recall = common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def gold_answers(example: SquadExample, version_2: bool) -> list[str]:
    """The gold texts a prediction is compared with (official per-version rules)."""
    texts = [a.text for a in example.answers]
    if not version_2:
        if not texts:
            raise SquadDataError(
                f"question {example.id!r} has no gold answer, which SQuAD v1.1 scoring cannot handle; "
                "evaluate with version_2=True"
            )
        return texts
    texts = [t for t in texts if normalize_answer(t)]
    return texts or [""]


def raw_scores(
    predictions: Mapping[str, str], examples: Sequence[SquadExample], version_2: bool
) -> tuple[dict[str, float], dict[str, float]]:
    """Per-question exact match and F1 (0/1 and 0..1), max over gold answers; missing -> 0."""
    exact, f1s, missing = {}, {}, []
    for example in examples:
        golds = gold_answers(example, version_2)
        if example.id not in predictions:
            missing.append(example.id)
            exact[example.id] = f1s[example.id] = 0.0
            continue
        pred = predictions[example.id]
        exact[example.id] = float(max(exact_match(pred, g) for g in golds))
        f1s[example.id] = max(f1(pred, g, version_2) for g in golds)
    if missing:
        log.warning("%d question(s) have no prediction and score 0 (first: %s)", len(missing), missing[0])
    return exact, f1s


def squad_metrics(
    predictions: Mapping[str, str], examples: Sequence[SquadExample], version_2: bool = False
) -> dict[str, float]:
    """Official SQuAD scores in percent: ``exact``, ``f1``, ``total``; v2.0 adds the breakdown.

    The breakdown keys are ``HasAns_exact``, ``HasAns_f1``, ``HasAns_total`` and ``NoAns_exact``,
    ``NoAns_f1``, ``NoAns_total``.
    """
    if not examples:
        raise SquadDataError("no SQuAD examples to score; check the data source and split")
    exact, f1s = raw_scores(predictions, examples, version_2)

    def block(ids: list[str]) -> tuple[float, float, int]:
        n = len(ids)
        return 100.0 * sum(exact[i] for i in ids) / n, 100.0 * sum(f1s[i] for i in ids) / n, n

    result: dict[str, float] = {}
    result["exact"], result["f1"], result["total"] = block([e.id for e in examples])
    if version_2:
        for name, ids in (
            ("HasAns", [e.id for e in examples if not e.is_impossible]),
            ("NoAns", [e.id for e in examples if e.is_impossible]),
        ):
            if ids:
                result[f"{name}_exact"], result[f"{name}_f1"], result[f"{name}_total"] = block(ids)
    return result


def best_threshold(
    non_null_answers: Mapping[str, str],
    null_diffs: Mapping[str, float],
    examples: Sequence[SquadExample],
    metric: str = "f1",
) -> tuple[float, float]:
    """``(best score in percent, threshold)``: the null-score threshold that maximises the v2.0 metric.

    ``non_null_answers`` and ``null_diffs`` come from
    :func:`~mlkd_scale.tasks.squad.postprocess.postprocess_predictions`; a question abstains
    (predicts ``""``) when its null diff is above the threshold. As in the official
    ``find_best_thresh``: start from "abstain everywhere" (each unanswerable question scores 1),
    then answer the questions in increasing null-diff order -- each one changes the total by
    (score of its answer - score of ``""``) -- and keep the best prefix. Three differences, so
    that the returned threshold reproduces the returned score exactly under :func:`squad_metrics`:
    questions with equal null diffs are answered together (the official loop may split a tie);
    "abstain everywhere" returns ``-inf`` (the official script returns 0.0 there); and both
    choices are scored with the metric itself (the official loop takes -1 for any non-empty raw
    answer to an unanswerable question, also one like ``"."`` that normalizes to empty).
    """
    if metric not in ("f1", "exact"):
        raise ValueError(f"metric must be 'f1' or 'exact', got {metric!r}")
    if not examples:
        raise SquadDataError("no SQuAD examples to tune a threshold on; check the data source and split")
    missing = [e.id for e in examples if e.id not in null_diffs]
    if missing:
        raise SquadDataError(f"question {missing[0]!r} has no null-score diff; pass postprocess's null_diffs")
    pick = 0 if metric == "exact" else 1
    answered = raw_scores(non_null_answers, examples, version_2=True)[pick]
    abstained = raw_scores({e.id: "" for e in examples}, examples, version_2=True)[pick]

    current = best = sum(abstained.values())  # every unanswerable question scores 1
    threshold = -math.inf
    order = sorted(answered, key=lambda qid: null_diffs[qid])
    for i, qid in enumerate(order):
        current += answered[qid] - abstained[qid]  # answer this question instead of abstaining
        tie_continues = i + 1 < len(order) and null_diffs[order[i + 1]] == null_diffs[qid]
        if not tie_continues and current > best:
            best, threshold = current, null_diffs[qid]
    return 100.0 * best / len(order), threshold
