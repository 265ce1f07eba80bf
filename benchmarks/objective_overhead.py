"""Cost of the full Stage-1 MLKD objective over a bare distillation step, measured side by side.

A "bare" step is teacher forward + student forward/backward with a trivial loss (the mean square of
the student's last hidden state); the "objective" step is the same with the feature taps on both
models and L_EMB + L_MHA + L_FFN (with the trainable projections). The two are timed alternately,
after warm-up, and the median of the per-pair ratios is printed, so machine noise hits both alike.

    .venv/bin/python benchmarks/objective_overhead.py              # BERT-base teacher, 4L-312 student
    .venv/bin/python benchmarks/objective_overhead.py --pairs 20 --batch 8 --seq 128
    .venv/bin/python benchmarks/objective_overhead.py --compile   # also the objective under torch.compile

``--baseline DIR`` adds the objective with the loss functions of another checkout (DIR, e.g. a
``git worktree`` of main: its ``mlkd_scale/losses/relation.py`` and ``feature.py``, everything else
this tree's) to the same rotation, so a change to the losses is measured against the code before it
in the same rounds:

    git worktree add /tmp/main-before main
    .venv/bin/python benchmarks/objective_overhead.py --threads 1 --baseline /tmp/main-before [--padding]

``--compile`` adds a further step, the same objective compiled as ``train.compile: objective`` does
(``nn.Module.compile`` of the losses and projections; the models stay eager), in the same rotation.

On a CPU the process keeps freed memory as a training rank does (``--malloc keep``,
:mod:`mlkd_scale.engine.host_memory`); ``--malloc system`` leaves glibc's defaults, under which both
steps take thousands of page faults per step.

Random weights: only shapes matter for time.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import os
import resource
import statistics
from pathlib import Path

import torch
from common import bare_step, build_models, make_batch, timed_with_cpu

from mlkd_scale.engine.host_memory import allocator_chosen_by_user, keep_freed_memory
from mlkd_scale.losses.presets import mlkd as mlkd_preset
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


#: The loss functions the mlkd preset calls, by the module that defines them.
BASELINE_FUNCTIONS = {
    "relation": ("embedding_relation_loss", "mha_relation_loss", "sample_similarity_loss"),
    "feature": ("hidden_mse_loss",),
}


def load_baseline(checkout: Path) -> dict:
    """The mlkd preset's loss functions as another checkout defines them (imported under private names)."""
    functions = {}
    for module, names in BASELINE_FUNCTIONS.items():
        path = checkout / "mlkd_scale" / "losses" / f"{module}.py"
        if not path.is_file():
            raise SystemExit(f"--baseline: {path} does not exist; give the root of a mlkd_scale checkout")
        spec = importlib.util.spec_from_file_location(f"_baseline_{module}", path)
        loaded = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(loaded)
        functions.update({name: getattr(loaded, name) for name in names})
    return functions


@contextlib.contextmanager
def preset_functions(functions: dict):
    """Run the mlkd preset with ``functions`` in place of its own loss functions, then put them back."""
    saved = {name: getattr(mlkd_preset, name) for name in functions}
    for name, function in functions.items():
        setattr(mlkd_preset, name, function)
    try:
        yield
    finally:
        for name, function in saved.items():
            setattr(mlkd_preset, name, function)


def make_baseline_step(step, functions: dict):
    def baseline_step(batch):
        with preset_functions(functions):
            step(batch)

    return baseline_step


def add_malloc_arg(parser) -> None:
    """``--malloc``: whether a CPU benchmark process keeps freed memory as a training rank does."""
    parser.add_argument(
        "--malloc", choices=["keep", "system"], default="keep",
        help="keep: glibc keeps freed memory for the next step, as on a training rank (mlkd_scale.engine."
             "host_memory); system: glibc's defaults (page faults every step)",
    )


def configure_malloc(args, device: str = "cpu") -> None:
    """Apply ``--malloc keep`` on a CPU, as :func:`~mlkd_scale.engine.distributed.init_distributed` does
    on a CPU rank; ``args.malloc`` then says what the process runs with."""
    if device != "cpu":
        args.malloc = "system (GPU run)"
    elif args.malloc == "keep" and not keep_freed_memory():
        args.malloc = f"as-is ({allocator_chosen_by_user() or 'no glibc mallopt'})"


def parse_args():
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
    parser.add_argument("--baseline", type=Path, help="also time the losses of this checkout (before/after)")
    add_malloc_arg(parser)
    return parser.parse_args()


def measure(steps: dict, batch: dict, trained: list, args, sync) -> dict[str, list[tuple[float, float, int]]]:
    """(wall s, process CPU s, page faults) of every step in every round; the order rotates round by round."""
    for _ in range(args.warmup):
        for fn in steps.values():
            fn(batch)
    timed: dict[str, list[tuple[float, float, int]]] = {name: [] for name in steps}
    names = list(steps)
    for i in range(args.pairs):
        order = names[i % len(names):] + names[: i % len(names)]  # every step takes every position
        for name in order:
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            wall, cpu = timed_with_cpu(lambda name=name: steps[name](batch), sync)
            timed[name].append((wall, cpu, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults))
        for module in trained:
            module.zero_grad(set_to_none=True)
    return timed


def paired(timed: dict, name: str, against: str, index: int) -> str:
    """Median over rounds of step ``name``'s time over step ``against``'s (0 = wall, 1 = CPU time), and
    the rounds' interquartile range: how far one round's ratio moves on this machine."""
    ratios = [a[index] / b[index] for a, b in zip(timed[name], timed[against], strict=True)]
    if len(ratios) < 2:
        return f"{ratios[0]:.3f}"
    low, _, high = statistics.quantiles(ratios, n=4)
    return f"{statistics.median(ratios):.3f} (quartiles {low:.3f}-{high:.3f})"


def fastest(timed: dict, name: str) -> str:
    """Step ``name``'s fastest CPU time over the bare step's fastest: the least disturbed round of each."""
    return f"{min(c for _, c, _ in timed[name]) / min(c for _, c, _ in timed['bare']):.3f}"


def report(timed: dict, args) -> None:
    tokens = args.batch * args.seq
    print(
        f"device={args.device} threads={torch.get_num_threads()} teacher=BERT-base({args.teacher_dtype}) "
        f"student=4L-312-{args.student_heads}h batch={args.batch} seq={args.seq} pairs={args.pairs} "
        f"padding={args.padding} malloc={args.malloc} load_avg={' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    print(f"{'step':<10} {'median s':>9} {'tokens/s':>9} {'CPU s':>7} {'page faults':>11}")
    for name, values in timed.items():
        median = statistics.median(wall for wall, _, _ in values)
        cpu = statistics.median(c for _, c, _ in values)
        faults = statistics.median(f for _, _, f in values)
        print(f"{name:<10} {median:>9.4f} {tokens / median:>9.0f} {cpu:>7.3f} {faults:>11.0f}")
    for name in timed:
        if name != "bare":
            print(f"overhead ratio {name}/bare (median of paired ratios): {paired(timed, name, 'bare', 0)}")
            print(f"same ratio in process CPU time (steadier on a busy machine): {paired(timed, name, 'bare', 1)}")
            print(f"ratio of the fastest steps (CPU time; a busy host only ever slows a step): {fastest(timed, name)}")
    if "baseline" in timed:
        print(f"objective/baseline (paired): wall {paired(timed, 'objective', 'baseline', 0)}, "
              f"CPU time {paired(timed, 'objective', 'baseline', 1)}")


def main() -> None:
    args = parse_args()
    configure_malloc(args, args.device)
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
    if args.baseline:
        steps["baseline"] = make_baseline_step(steps["objective"], load_baseline(args.baseline))
    if args.compile:
        compiled = copy.deepcopy(objective)
        compiled.compile()
        steps["compiled"] = make_objective_step(t_tap, s_tap, compiled)
        trained.append(compiled)
    report(measure(steps, batch, trained, args, sync), args)


if __name__ == "__main__":
    main()
