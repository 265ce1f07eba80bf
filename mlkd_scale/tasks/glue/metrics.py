"""The official GLUE metrics, implemented here with numpy alone.

Our own code rather than scikit-learn/scipy calls, so evaluation has no hidden dependency, returns
plain floats, and behaves predictably on the degenerate inputs an early checkpoint produces:

* constant predictions (or constant labels) give ``matthews_corrcoef = 0`` and
  ``pearson = spearman = 0`` instead of scikit-learn's 0 / scipy's NaN with a warning, so
  best-checkpoint selection never compares against NaN;
* no positive prediction and no positive label gives ``f1_binary = 0`` (scikit-learn's
  ``zero_division`` default);
* NaN predictions (a diverged regressor) propagate to NaN correlations: that is a real failure.

The tests check every function against scikit-learn and scipy on many random inputs.

Per task (:func:`glue_metrics` keys; :func:`main_metric` is the one used to pick checkpoints,
following the GLUE leaderboard, which scores MRPC/QQP by the mean of F1 and accuracy and STS-B by
the mean of Pearson and Spearman):

=================================  ===============================  ==============
task                               keys                             main metric
=================================  ===============================  ==============
CoLA                               mcc                              mcc
SST-2, QNLI, RTE, WNLI, MNLI       acc                              acc
MRPC, QQP                          acc, f1, acc_and_f1              acc_and_f1
STS-B                              pearson, spearman, corr          corr
=================================  ===============================  ==============

MNLI's matched and mismatched dev sets are scored by separate calls; model selection uses matched.
"""

from __future__ import annotations

import numpy as np

from mlkd_scale.tasks.glue.table import GlueTask, get_task


def _pair(predictions, labels) -> tuple[np.ndarray, np.ndarray]:
    pred, gold = np.asarray(predictions).reshape(-1), np.asarray(labels).reshape(-1)
    if pred.shape != gold.shape:
        raise ValueError(f"{pred.size} predictions for {gold.size} labels")
    if pred.size == 0:
        raise ValueError("no predictions to score")
    return pred, gold


def accuracy(predictions, labels) -> float:
    """Fraction of predictions equal to their label."""
    pred, gold = _pair(predictions, labels)
    return float(np.mean(pred == gold))


def f1_binary(predictions, labels) -> float:
    """F1 of the positive class 1: ``2 tp / (2 tp + fp + fn)``; 0 when tp = 0 (incl. no positives at all)."""
    pred, gold = _pair(predictions, labels)
    tp = float(np.sum((pred == 1) & (gold == 1)))
    wrong = float(np.sum((pred == 1) != (gold == 1)))  # fp + fn
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + wrong)


def matthews_corrcoef(predictions, labels) -> float:
    """Matthews correlation (multi-class R_K form, as scikit-learn); 0 when either side is constant.

    With confusion matrix C (rows gold, columns predicted), t = row sums, p = column sums, c = trace,
    s = total: ``(c s - t.p) / sqrt((s^2 - p.p) (s^2 - t.t))``.
    """
    pred, gold = _pair(predictions, labels)
    classes, codes = np.unique(np.concatenate([gold, pred]), return_inverse=True)
    k, n = len(classes), gold.size
    confusion = np.zeros((k, k), dtype=np.float64)
    np.add.at(confusion, (codes[:n], codes[n:]), 1.0)
    t, p = confusion.sum(axis=1), confusion.sum(axis=0)
    c, s = np.trace(confusion), float(n)
    cov_tp = c * s - t @ p
    cov_pp = s * s - p @ p
    cov_tt = s * s - t @ t
    if cov_pp * cov_tt == 0:
        return 0.0
    return float(cov_tp / np.sqrt(cov_tt * cov_pp))


def pearson(predictions, labels) -> float:
    """Pearson's r in float64; 0 when either side is constant (undefined, scipy gives NaN)."""
    x, y = (a.astype(np.float64) for a in _pair(predictions, labels))
    if x.size < 2:
        raise ValueError("a correlation needs at least 2 values")
    if np.isnan(x).any() or np.isnan(y).any():
        return float("nan")
    if np.all(x == x[0]) or np.all(y == y[0]):
        return 0.0
    dx, dy = x - x.mean(), y - y.mean()
    # scale first so that very large or tiny scores neither overflow nor underflow the products
    dx, dy = dx / np.max(np.abs(dx)), dy / np.max(np.abs(dy))
    denom = np.sqrt(dx @ dx) * np.sqrt(dy @ dy)
    return float(np.clip(dx @ dy / denom, -1.0, 1.0))


def rankdata(values) -> np.ndarray:
    """1-based ranks, ties sharing the average of the ranks they span (what Spearman's rho uses)."""
    x = np.asarray(values).reshape(-1)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    starts = np.flatnonzero(np.concatenate([[True], xs[1:] != xs[:-1]]))  # first index of each tie group
    ends = np.append(starts[1:], x.size)  # one past the last
    group_rank = (starts + 1 + ends) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = np.repeat(group_rank, ends - starts)
    return ranks


def spearman(predictions, labels) -> float:
    """Spearman's rho: Pearson's r of the average ranks; 0 when either side is constant."""
    pred, gold = _pair(predictions, labels)
    if np.isnan(pred.astype(np.float64)).any() or np.isnan(gold.astype(np.float64)).any():
        return float("nan")
    return pearson(rankdata(pred), rankdata(gold))


def main_metric(task: str | GlueTask) -> str:
    """The key of :func:`glue_metrics` used for best-checkpoint selection (see the module table)."""
    return get_task(task).main_metric


def glue_metrics(task: str | GlueTask, predictions, labels) -> dict[str, float]:
    """The official metrics of ``task`` as plain floats.

    ``predictions`` are class ids ``[N]`` or logits ``[N, num_labels]`` (arg-maxed here) for
    classification, scores ``[N]`` or ``[N, 1]`` for STS-B; torch tensors are accepted.
    """
    spec = get_task(task)
    pred, gold = _as_numpy(predictions), _as_numpy(labels)
    if spec.is_regression:
        pred, gold = pred.reshape(-1).astype(np.float64), gold.reshape(-1).astype(np.float64)
        r, rho = pearson(pred, gold), spearman(pred, gold)
        return {"pearson": r, "spearman": rho, "corr": (r + rho) / 2}
    if pred.ndim == 2:
        if pred.shape[1] != spec.num_labels:
            raise ValueError(f"{spec.name} logits must have {spec.num_labels} columns, got {pred.shape[1]}")
        pred = pred.argmax(axis=1)
    pred, gold = pred.reshape(-1).astype(np.int64), gold.reshape(-1).astype(np.int64)
    if spec.main_metric == "mcc":
        return {"mcc": matthews_corrcoef(pred, gold)}
    acc = accuracy(pred, gold)
    if spec.main_metric == "acc_and_f1":
        f1 = f1_binary(pred, gold)
        return {"acc": acc, "f1": f1, "acc_and_f1": (acc + f1) / 2}
    return {"acc": acc}


def _as_numpy(values) -> np.ndarray:
    if hasattr(values, "detach"):  # a torch tensor, possibly on an accelerator or in bf16
        values = values.detach().float().cpu().numpy() if values.is_floating_point() else values.cpu().numpy()
    return np.asarray(values)
