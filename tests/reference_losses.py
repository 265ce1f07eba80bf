"""Plain loop-by-loop reference implementations of the losses, written from the formulas alone."""

import math

import torch


def _kl(p: list[float], q: list[float]) -> float:
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q) if pi > 0)


def _softmax(xs: list[float]) -> list[float]:
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    s = sum(e)
    return [v / s for v in e]


def _dot(u, v) -> float:
    return sum(float(a) * float(b) for a, b in zip(u, v))


def relation(t, s, mask, num_splits):
    """t [B,L,dT], s [B,L,dS], mask [B,L] or None; average KL over real rows and splits."""
    B, L, _ = t.shape
    total, count = 0.0, 0
    for b in range(B):
        real = [j for j in range(L) if mask is None or mask[b, j] == 1]
        for a in range(num_splits):
            wt, ws = t.shape[-1] // num_splits, s.shape[-1] // num_splits
            tv = [t[b, j, a * wt:(a + 1) * wt].tolist() for j in range(L)]
            sv = [s[b, j, a * ws:(a + 1) * ws].tolist() for j in range(L)]
            for i in real:
                p = _softmax([_dot(tv[i], tv[j]) / math.sqrt(wt) for j in real])
                q = _softmax([_dot(sv[i], sv[j]) / math.sqrt(ws) for j in real])
                total += _kl(p, q)
                count += 1
    return total / count


def sample_similarity(t, s):
    B = t.shape[0]
    total = 0.0
    for i in range(B):
        p = _softmax([_dot(t[i], t[j]) / math.sqrt(t.shape[1]) for j in range(B)])
        q = _softmax([_dot(s[i], s[j]) / math.sqrt(s.shape[1]) for j in range(B)])
        total += _kl(p, q)
    return total / B


def hidden_mse(t, s, mask):
    B, L, d = t.shape
    total, n = 0.0, 0
    for b in range(B):
        for i in range(L):
            if mask[b, i] == 1:
                total += sum((float(s[b, i, k]) - float(t[b, i, k])) ** 2 for k in range(d))
                n += d
    return total / n


def contrastive(t, s, labels, tau):
    z = [v / v.norm() for v in list(s) + list(t)]
    lab = list(labels.tolist()) * 2
    n = len(z)
    losses = []
    for i in range(n):
        pos = [p for p in range(n) if p != i and lab[p] == lab[i]]
        if not pos:
            continue
        denom = sum(math.exp(_dot(z[i], z[a]) / tau) for a in range(n) if a != i)
        losses.append(-sum(math.log(math.exp(_dot(z[i], z[p]) / tau) / denom) for p in pos) / len(pos))
    return sum(losses) / len(losses)


def prediction_kd(t, s, tau):
    B = t.shape[0]
    return sum(_kl(_softmax((t[b] / tau).tolist()), _softmax((s[b] / tau).tolist())) for b in range(B)) / B * tau**2


def to_float64(*xs):
    return [x.detach().to(torch.float64) for x in xs]
