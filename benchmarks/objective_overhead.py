"""Cost of the full Stage-1 MLKD objective over a bare distillation step, measured side by side.

A "bare" step is teacher forward + student forward/backward with a trivial loss (the mean square of
the student's last hidden state); the "objective" step is the same with the feature taps on both
models and L_EMB + L_MHA + L_FFN (with the trainable projections). The two are timed alternately,
after warm-up, and the median of the per-pair ratios is printed, so machine noise hits both alike.

    .venv/bin/python benchmarks/objective_overhead.py              # BERT-base teacher, 4L-312 student
    .venv/bin/python benchmarks/objective_overhead.py --pairs 20 --batch 8 --seq 128
    .venv/bin/python benchmarks/objective_overhead.py --compile   # also the objective under torch.compile

``--compile`` adds a third step, the same objective compiled as ``train.compile: objective`` does
(``nn.Module.compile`` of the losses and projections; the models stay eager), in the same rotation.

Random weights: only shapes matter for time.
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch
from common import bare_step, build_models, make_batch, timed_with_cpu

from mlkd_scale.models import FeatureTap
from mlkd_scale.models.teacher import DTYPES


def build(args):
    teacher, student, objective = build_models(
        "bert-base", args.device, args.teacher_dtype, args.student_heads
    )
    batch = make_batch(args.batch, args.seq, args.device, teacher.config.vocab_size, pad=args.padding)
    if not args.padding:
        # Packed general-distillation batches have no padding; the engine then passes no mask at
        # all, which spares the models' mask building and the losses' masking.
        del batch["attention_mask"]
    return teacher, student, objective, batch


def make_objective_step(t_tap: FeatureTap, s_tap: FeatureTap, objective):
    def step(batch):
        with torch.no_grad():
            t_feats = t_tap(**batch)
        s_feats = s_tap(**batch)
        total, _ = objective(t_feats, s_feats, batch.get("attention_mask"))
        total.backward()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--pairs", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--student-heads", type=int, default=12)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--teacher-dtype", choices=list(DTYPES), default=None)
    parser.add_argument(
        "--padding", action="store_true", help="pad half of one row (task batches) instead of packed full rows"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 on a shared CPU machine)")
    parser.add_argument("--compile", action="store_true", help="also time the objective under torch.compile")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.teacher_dtype = args.teacher_dtype or ("bf16" if args.device == "cuda" else "fp32")
    torch.manual_seed(0)
    teacher, student, objective, batch = build(args)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    t_tap = FeatureTap(teacher, objective.teacher_request())  # the compiled copy asks for the same
    s_tap = FeatureTap(student, objective.student_request())
    steps = {
        "bare": lambda batch: bare_step(teacher, student, batch),
        "objective": make_objective_step(t_tap, s_tap, objective),
    }
    trained = [student, objective]
    if args.compile:
        compiled = copy.deepcopy(objective)
        compiled.compile()
        steps["compiled"] = make_objective_step(t_tap, s_tap, compiled)
        trained.append(compiled)
    for _ in range(args.warmup):
        for fn in steps.values():
            fn(batch)
    times: dict[str, list[float]] = {name: [] for name in steps}
    ratios: dict[str, list[float]] = {name: [] for name in steps if name != "bare"}
    cpu_ratios: dict[str, list[float]] = {name: [] for name in ratios}
    names = list(steps)
    for i in range(args.pairs):
        order = names[i % len(names):] + names[: i % len(names)]  # every step takes every position
        timed = {name: timed_with_cpu(lambda name=name: steps[name](batch), sync) for name in order}
        for name, (seconds, _) in timed.items():
            times[name].append(seconds)
        for name in ratios:
            ratios[name].append(timed[name][0] / timed["bare"][0])
            cpu_ratios[name].append(timed[name][1] / timed["bare"][1])
        for module in trained:
            module.zero_grad(set_to_none=True)
    tokens = args.batch * args.seq
    print(
        f"device={args.device} threads={torch.get_num_threads()} teacher=BERT-base({args.teacher_dtype}) "
        f"student=4L-312-{args.student_heads}h batch={args.batch} seq={args.seq} pairs={args.pairs} "
        f"padding={args.padding}"
    )
    print(f"{'step':<10} {'median s':>9} {'tokens/s':>9}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<10} {median:>9.4f} {tokens / median:>9.0f}")
    for name in ratios:
        print(f"overhead ratio {name}/bare (median of paired ratios): {statistics.median(ratios[name]):.3f}")
        cpu = statistics.median(cpu_ratios[name])
        print(f"same ratio in process CPU time (steadier on a busy machine): {cpu:.3f}")


if __name__ == "__main__":
    main()
