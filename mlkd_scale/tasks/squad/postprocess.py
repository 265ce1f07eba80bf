"""Start/end logits of every window -> one answer text per question (``run_qa.py`` semantics).

Per feature, the ``n_best_size`` highest start logits and the ``n_best_size`` highest end logits
are paired; a pair is a candidate when both tokens are context tokens (their offset is not
``None``), end >= start and the span has at most ``max_answer_length`` tokens. Its score is
``start_logit + end_logit``. The answer is the best candidate over all windows of the question,
cut from the context by character offsets (so it is the original text, not detokenized pieces).

SQuAD v2.0 adds abstention: the null score of a window is ``start[0] + end[0]`` (both at [CLS]),
the question's null score is the minimum over its windows (the window most confident that an
answer exists), and the prediction is ``""`` when ``null_score - best_non_null > threshold``.
That difference is returned per question so that the threshold can be tuned on dev
(:func:`~mlkd_scale.tasks.squad.metrics.best_threshold`) without recomputing logits.

Where no candidate exists at all (every top pair invalid) the best non-null answer is ``""`` with
score ``-inf`` (so its null-score difference is ``+inf``); ``run_qa.py`` predicts the placeholder
text ``"empty"`` with score 0 there, which scores the same (wrong) under the metrics.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np

from mlkd_scale.tasks.squad.examples import SquadDataError, SquadExample


class SquadPredictions(NamedTuple):
    """What :func:`postprocess_predictions` returns (unpacks as a tuple)."""

    answers: dict[str, str]
    """id -> predicted text, after the null-score threshold for v2.0 (``""`` means no answer)."""
    null_diffs: dict[str, float]
    """id -> null score minus best non-null score (higher = more confident there is no answer)."""
    non_null_answers: dict[str, str]
    """id -> best non-null text, the prediction if the model never abstained (threshold tuning)."""


def _as_numpy(logits) -> np.ndarray:
    if hasattr(logits, "detach"):  # torch tensor, possibly bf16 on a device
        logits = logits.detach().float().cpu().numpy()
    return np.asarray(logits, dtype=np.float64)


def _best_span(
    start: np.ndarray, end: np.ndarray, offsets: Sequence, n_best_size: int, max_answer_length: int
) -> tuple[float, tuple[int, int] | None]:
    """Best (score, character span) among one feature's valid top-n start/end pairs."""
    n = len(offsets)
    best_score, best_span = -math.inf, None
    starts = np.argsort(start, kind="stable")[::-1][:n_best_size]
    ends = np.argsort(end, kind="stable")[::-1][:n_best_size]
    for s in starts.tolist():
        if s >= n or offsets[s] is None:
            continue
        for e in ends.tolist():
            if e >= n or offsets[e] is None or e < s or e - s + 1 > max_answer_length:
                continue
            score = float(start[s] + end[e])
            if score > best_score and offsets[s][0] < offsets[e][1]:  # empty text is never an answer
                best_score, best_span = score, (offsets[s][0], offsets[e][1])
    return best_score, best_span


def postprocess_predictions(
    examples: Sequence[SquadExample],
    features: Mapping,
    start_logits,
    end_logits,
    n_best_size: int = 20,
    max_answer_length: int = 30,
    version_2: bool = False,
    null_score_diff_threshold: float = 0.0,
) -> SquadPredictions:
    """One answer per example from per-feature logits ([F, L] arrays/tensors, F = features' rows).

    ``features`` is what :func:`~mlkd_scale.tasks.squad.features.prepare_eval_features` returned
    for the same ``examples``. Returns ``(answers, null_diffs, non_null_answers)``; for v1.1
    ``answers == non_null_answers``.
    """
    start_logits, end_logits = _as_numpy(start_logits), _as_numpy(end_logits)
    offsets = features["offset_mapping"]
    example_index = [int(i) for i in features["example_index"]]
    if not (len(start_logits) == len(end_logits) == len(offsets) == len(example_index)):
        raise SquadDataError(
            f"got {len(start_logits)} start and {len(end_logits)} end logit rows for "
            f"{len(offsets)} features; pass the logits of every eval feature, in order"
        )
    by_example: dict[int, list[int]] = defaultdict(list)
    for f, ex in enumerate(example_index):
        by_example[ex].append(f)

    answers, null_diffs, non_null = {}, {}, {}
    for ex, example in enumerate(examples):
        best_score, best_text, null_score = -math.inf, "", math.inf
        for f in by_example.get(ex, ()):
            null_score = min(null_score, float(start_logits[f][0] + end_logits[f][0]))
            score, span = _best_span(
                start_logits[f], end_logits[f], offsets[f], n_best_size, max_answer_length
            )
            if span is not None and score > best_score:
                best_score, best_text = score, example.context[span[0] : span[1]]
        if null_score == math.inf:
            raise SquadDataError(
                f"example {example.id!r} has no features; build features from the same examples"
            )
        diff = null_score - best_score  # +inf when there is no candidate at all
        non_null[example.id] = best_text
        null_diffs[example.id] = diff
        abstain = version_2 and diff > null_score_diff_threshold
        answers[example.id] = "" if abstain else best_text
    return SquadPredictions(answers, null_diffs, non_null)


def apply_threshold(
    non_null_answers: Mapping[str, str], null_diffs: Mapping[str, float], threshold: float
) -> dict[str, str]:
    """v2.0 predictions for another threshold: ``""`` where ``null_diff > threshold``."""
    return {qid: ("" if null_diffs[qid] > threshold else text) for qid, text in non_null_answers.items()}
