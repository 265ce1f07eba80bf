"""The Stage-1 MLKD objective's own cost, new against a baseline checkout's losses: CPU time, interleaved.

Step-level ratios (``objective_overhead.py``) move by several points between runs on a busy machine,
more than a change to the losses is worth; this script times the parts alone, in one process, the
candidates alternating, and counts the measuring thread's CPU time (``time.thread_time``), which
other processes disturb far less than wall time:

* ``relation``: the five relation losses of one step (L_EMB + 4 × L_MHA), forward + backward;
* ``ffn``: the four L_FFN MSEs (projected student states given), forward + backward;
* ``objective``: the whole objective (taps' features given, projections included), forward + backward;
* ``projections``: the four W_h projections alone (forward + backward of a sum), their FLOP floor;
* ``bare``: teacher forward + student forward/backward with a trivial loss, for the percentages.

Each is run with this tree's loss functions and with those of ``--baseline DIR`` (another checkout,
as in ``objective_overhead.py --baseline``); loss values and gradients of the two are compared first.

    .venv/bin/python benchmarks/objective_parts.py --baseline /tmp/main-before [--padding] [--repeats 20]

BERT-base-shaped teacher → 4L-312-12h student, batch 8, seq 128, random weights, one thread.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from pathlib import Path

import torch
from common import bare_step, build_models, make_batch
from objective_overhead import add_malloc_arg, configure_malloc, load_baseline, preset_functions

from mlkd_scale.losses.presets import mlkd as mlkd_preset
from mlkd_scale.models import FeatureTap


def tapped_features(args):
    """The objective, the models, one batch and its tapped features (the student's as leaves)."""
    torch.manual_seed(0)
    teacher, student, objective = build_models("bert-base", "cpu", "fp32")
    batch = make_batch(args.batch, args.seq, "cpu", teacher.config.vocab_size, pad=args.padding)
    if not args.padding:
        del batch["attention_mask"]
    with torch.no_grad():
        t_feats = FeatureTap(teacher, objective.teacher_request())(**batch)
        s_feats = FeatureTap(student, objective.student_request())(**batch)
    leaf = {"embeddings": s_feats.embeddings.detach().requires_grad_()}
    for key in ("context", "hidden"):
        leaf[key] = {n: v.detach().requires_grad_() for n, v in getattr(s_feats, key).items()}
    return teacher, student, objective, batch, t_feats, dataclasses.replace(s_feats, **leaf)


def candidates(args) -> dict:
    """name → (function of the loss functions in use → scalar that was back-propagated)."""
    teacher, student, objective, batch, t, s = tapped_features(args)
    mask, pairs = batch.get("attention_mask"), objective.preset.setup.pairs
    projected = {n: objective.projections[n - 1](s.hidden[n]).detach().requires_grad_() for n, _ in pairs}
    probe = torch.randn(args.batch * args.seq, objective.d_student, requires_grad=True)

    def relation():
        loss = mlkd_preset.embedding_relation_loss(t.embeddings, s.embeddings, mask)
        splits = objective.num_splits
        return loss + sum(mlkd_preset.mha_relation_loss(t.context[m], s.context[n], mask, splits) for n, m in pairs)

    def ffn():
        return sum(mlkd_preset.hidden_mse_loss(t.hidden[m], projected[n], mask) for n, m in pairs)

    def projections():
        return sum(p(probe).sum() for p in objective.projections)

    def bare():
        bare_step(teacher, student, batch)
        return torch.zeros(())

    return {"relation": relation, "ffn": ffn, "objective": lambda: objective(t, s, mask)[0],
            "projections": projections, "bare": bare}


def run(fn) -> torch.Tensor:
    loss = fn()
    if loss.requires_grad:
        loss.backward()
    return loss.detach()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, required=True, help="checkout whose loss functions to compare")
    parser.add_argument("--padding", action="store_true", help="pad half of one row (task batches)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    add_malloc_arg(parser)
    args = parser.parse_args()
    configure_malloc(args)
    torch.set_num_threads(1)
    base = load_baseline(args.baseline)
    parts = candidates(args)
    for name in ("relation", "ffn", "objective"):
        new = run(parts[name])
        with preset_functions(base):
            old = run(parts[name])
        print(f"{name}: new {new.item():.9g}, baseline {old.item():.9g}, relative difference "
              f"{abs(new - old).item() / abs(old).item():.1e}")
    timed = {(name, side): [] for name in parts for side in ("new", "baseline")}
    for r in range(args.repeats):
        for name, side in (list(timed) if r % 2 else list(timed)[::-1]):
            with preset_functions(base if side == "baseline" else {}):
                start = time.thread_time()
                run(parts[name])
                timed[name, side].append(time.thread_time() - start)
    bare = statistics.median(timed["bare", "new"] + timed["bare", "baseline"])
    print(f"padding={args.padding} repeats={args.repeats} malloc={args.malloc} load_avg={' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"{'part':<12} {'new CPU ms':>10} {'% of bare':>9} {'baseline ms':>11} {'% of bare':>9} {'new/base':>8}")
    for name in parts:
        new, old = timed[name, "new"], timed[name, "baseline"]
        ratio = statistics.median(a / b for a, b in zip(new, old, strict=True))
        n, o = statistics.median(new), statistics.median(old)
        print(f"{name:<12} {n * 1e3:>10.1f} {n / bare:>9.2%} {o * 1e3:>11.1f} {o / bare:>9.2%} {ratio:>8.3f}")


if __name__ == "__main__":
    main()
