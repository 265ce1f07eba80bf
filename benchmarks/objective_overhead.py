"""Cost of the full Stage-1 MLKD objective over a bare distillation step, measured side by side.

A "bare" step is teacher forward + student forward/backward with a trivial loss (the mean square of
the student's last hidden state); the "objective" step is the same with the feature taps on both
models and L_EMB + L_MHA + L_FFN (with the trainable projections). The two are timed alternately,
after warm-up, and the median of the per-pair ratios is printed, so machine noise hits both alike.

    .venv/bin/python benchmarks/objective_overhead.py              # BERT-base teacher, 4L-312 student
    .venv/bin/python benchmarks/objective_overhead.py --pairs 20 --batch 8 --seq 128

Random weights: only shapes matter for time.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import BertConfig, BertModel

from mlkd_scale.losses import DistillationObjective
from mlkd_scale.models import FeatureTap, build_student, build_student_config
from mlkd_scale.models.teacher import DTYPES, freeze
from mlkd_scale.spec import LossesSpec, StudentSpec


def build(args):
    device = torch.device(args.device)
    teacher_config = BertConfig(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072
    )
    teacher = freeze(BertModel(teacher_config)).to(device, DTYPES[args.teacher_dtype])
    student_spec = StudentSpec(num_layers=4, hidden_size=312, num_heads=args.student_heads, intermediate_size=1200)
    objective = DistillationObjective(LossesSpec(), teacher.config, build_student_config(teacher.config, student_spec))
    student = build_student(teacher, student_spec, objective.layer_map).to(device).train()
    objective.to(device)
    g = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(1000, 30000, (args.batch, args.seq), generator=g).to(device),
        "attention_mask": torch.ones(args.batch, args.seq, dtype=torch.long, device=device),
    }
    batch["attention_mask"][0, args.seq // 2 :] = 0  # some padding, as in real batches
    return teacher, student, objective, batch


def bare_step(teacher, student, batch):
    with torch.no_grad():
        teacher(**batch)
    loss = student(**batch).last_hidden_state.float().square().mean()
    loss.backward()


def make_objective_step(teacher, student, objective):
    t_tap = FeatureTap(teacher, objective.teacher_request())
    s_tap = FeatureTap(student, objective.student_request())

    def step(batch):
        with torch.no_grad():
            t_feats = t_tap(**batch)
        s_feats = s_tap(**batch)
        total, _ = objective(t_feats, s_feats, batch["attention_mask"])
        total.backward()

    return step


def timed(fn, sync) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--pairs", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--student-heads", type=int, default=12)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--teacher-dtype", choices=list(DTYPES), default=None)
    args = parser.parse_args()
    args.teacher_dtype = args.teacher_dtype or ("bf16" if args.device == "cuda" else "fp32")
    torch.manual_seed(0)
    teacher, student, objective, batch = build(args)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    objective_step = make_objective_step(teacher, student, objective)
    steps = {"bare": lambda: bare_step(teacher, student, batch), "objective": lambda: objective_step(batch)}
    for _ in range(args.warmup):
        for fn in steps.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in steps}
    ratios = []
    for i in range(args.pairs):
        order = list(steps) if i % 2 == 0 else list(reversed(steps))
        pair = {name: timed(steps[name], sync) for name in order}
        for name, seconds in pair.items():
            times[name].append(seconds)
        ratios.append(pair["objective"] / pair["bare"])
        student.zero_grad(set_to_none=True)
        objective.zero_grad(set_to_none=True)
    tokens = args.batch * args.seq
    print(
        f"device={args.device} threads={torch.get_num_threads()} teacher=BERT-base({args.teacher_dtype}) "
        f"student=4L-312-{args.student_heads}h batch={args.batch} seq={args.seq} pairs={args.pairs}"
    )
    print(f"{'step':<10} {'median s':>9} {'tokens/s':>9}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<10} {median:>9.4f} {tokens / median:>9.0f}")
    print(f"overhead ratio objective/bare (median of paired ratios): {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
