"""Our engine against a plain Hugging Face loop and TextBrewer, side by side in one run.

Every candidate distils the same random BERT-base-shaped teacher into the same 4-layer/312 student
(each candidate gets its own copy of both, with identical weights, so that hooks, attention settings
and optimizer states cannot leak between them), on the same batch, and is timed as one full
training step: teacher forward, student forward, losses, backward, gradient clipping (norm 1.0),
AdamW step (the project's optimizer settings). Candidates:

* ``bare``          teacher forward + student forward/backward with a trivial loss (the mean square of
                    the last hidden state) + the optimizer step; SDPA attention. The floor.
* ``bare-eager``    the same with eager attention in every layer, the price the peers pay for
                    TinyBERT's attention maps before any loss is computed.
* ``bare-engine``   the bare step (SDPA) through our DeepSpeed engine (same config as ours): the price
                    of the engine's backward/step machinery alone, without taps or losses.
* ``ours-tinybert`` our DeepSpeed engine step (``FeatureTap`` + ``DistillationObjective`` with
                    ``LossesSpec(preset="tinybert")``; ZeRO stage ``--zero-stage``); attention scores
                    computed in the mapped layers only (4 of the teacher's 12), SDPA in the others.
* ``ours-mlkd``     the same with the ``mlkd`` preset (L_EMB + L_MHA + L_FFN), SDPA attention.
* ``hf-loop``       a plain PyTorch loop over Hugging Face outputs (``output_hidden_states=True,
                    output_attentions=True``, eager attention registered to return the scores,
                    :data:`EAGER_SCORES`) computing TinyBERT's losses by hand.
* ``textbrewer``    TextBrewer's ``GeneralDistiller`` with intermediate matches ``hidden_mse`` (with a
                    ``linear`` ``proj`` per layer) and ``attention_mse``: one iteration of the body of
                    its ``train_with_num_steps`` loop — ``train_on_batch`` (its own forward and
                    ``compute_loss``), ``write_loss`` (which calls ``.item()`` on every term even
                    without a log dir), backward, clipping of the student's parameters, step.

TinyBERT's losses here, as its task_distill.py computes them: embedding and hidden-state MSE through
one shared ``fit_dense`` projection, uniformly mapped layers (student n ← teacher 3n for 4 of 12),
and the MSE of the unnormalised attention scores with masked entries (≤ −100) zeroed; equal head
counts (12/12); every mean over all positions, padding included (the batch has padding in its first
row). TextBrewer's built-in matches differ in two details that cost the same: a projection per match
and a −1e-3 zeroing threshold (see :func:`textbrewer_matches`).

Candidates alternate in rounds after warm-up (the order rotates each round, so each candidate runs
in each position equally often); the table shows each candidate's median step time, tokens/s, the
median over rounds of its time ÷ the bare step's time in the same round, and the same paired ratio
against ``ours-tinybert`` (above 1: our tinybert step's tokens/s is that many times the candidate's).
The same three figures follow for the process's CPU time per step, which other processes on a busy
machine disturb far less than wall time (on GPU it is the host-side cost of the step).

    .venv/bin/python benchmarks/peers.py --rounds 3                  # CPU, a few minutes
    .venv/bin/python benchmarks/peers.py --rounds 10 --batch 64      # GPU

Needs ``pip install --no-deps textbrewer`` (0.2.1.post1 imports and runs as is with transformers 5);
without it the textbrewer row is skipped with a note.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from common import (
    SHAPES,
    add_precision_args,
    build_models,
    format_facts,
    format_table,
    machine_facts,
    make_batch,
    median,
    peak_memory_gib,
    quiet_libraries,
    reset_peak_memory,
    resolve_defaults,
    synchronizer,
    timed_with_cpu,
)
from peer_steps import (
    EAGER_SCORES,
    GRAD_CLIP,
    make_bare,
    make_bare_engine,
    make_hf_loop,
    make_ours,
    make_textbrewer,
)

from mlkd_scale.engine.distributed import init_distributed
from mlkd_scale.models import resolve_layer_mapping
from mlkd_scale.spec import LossesSpec, TrainSpec

CANDIDATES = ("bare", "bare-eager", "bare-engine", "ours-tinybert", "ours-mlkd", "hf-loop", "textbrewer")


def build_candidates(args, device: torch.device, world_size: int, output_dir: str) -> tuple[dict, list[str]]:
    """Each candidate's step function (on its own copies of the models), and notes on skipped ones."""
    heads = SHAPES[args.shapes][0]["num_attention_heads"]  # equal head counts: TinyBERT's attention loss
    teacher, student, _ = build_models(args.shapes, device, args.teacher_dtype, heads)
    layer_map = resolve_layer_mapping(
        LossesSpec(preset="tinybert").layer_mapping,
        student.config.num_hidden_layers,
        teacher.config.num_hidden_layers,
    )
    train = TrainSpec(max_steps=10**6, grad_clip=GRAD_CLIP)
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.student_precision)

    def autocast():
        if half is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=half)

    def copies(attention: str):
        t, s = copy.deepcopy(teacher), copy.deepcopy(student)
        t.set_attn_implementation(attention)
        s.set_attn_implementation(attention)
        return t, s

    steps: dict[str, Callable[[dict], None]] = {}
    notes: list[str] = []
    for name in args.candidates:
        if name == "bare":
            steps[name] = make_bare(*copies("sdpa"), train, device, autocast)
        elif name == "bare-eager":
            steps[name] = make_bare(*copies("eager"), train, device, autocast)
        elif name == "bare-engine":
            steps[name] = make_bare_engine(*copies("sdpa"), args, world_size)
        elif name == "ours-tinybert":
            steps[name] = make_ours(*copies("sdpa"), "tinybert", args, device, world_size)
        elif name == "ours-mlkd":
            steps[name] = make_ours(*copies("sdpa"), "mlkd", args, device, world_size)
        elif name == "hf-loop":
            steps[name] = make_hf_loop(*copies(EAGER_SCORES), layer_map, train, device, autocast)
        elif name == "textbrewer":
            try:
                import textbrewer  # noqa: F401
            except ImportError as exc:
                notes.append(f"textbrewer skipped: {exc} (pip install --no-deps textbrewer)")
                continue
            upcast = args.teacher_dtype != "fp32" and half is None
            steps[name] = make_textbrewer(
                *copies(EAGER_SCORES), layer_map, train, device, autocast, output_dir, upcast
            )
    return steps, notes


# ---- the run -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=None, help="default 64 on GPU, 8 on CPU")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (each runs every candidate once)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument(
        "--shapes", choices=list(SHAPES), default="bert-base", help="'tiny' is for smoke tests"
    )
    parser.add_argument(
        "--candidates", default=",".join(CANDIDATES), help=f"comma-separated subset of {','.join(CANDIDATES)}"
    )
    add_precision_args(parser, "DeepSpeed precision for ours, autocast dtype for the others (default bf16 on GPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    args.candidates = [c.strip() for c in args.candidates.split(",") if c.strip()]
    unknown = sorted(set(args.candidates) - set(CANDIDATES))
    if unknown:
        parser.error(f"unknown candidates {unknown}; choose from {', '.join(CANDIDATES)}")
    return args


def run(args: argparse.Namespace) -> dict:
    quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    dist = init_distributed()
    if dist.world_size != 1:
        raise SystemExit("peers.py compares tools in one process; run it with python, not a launcher")
    device = dist.device
    resolve_defaults(args, device, dist.world_size)
    gpu = device.type == "cuda"
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="peers-") as output_dir:
        steps, notes = build_candidates(args, device, dist.world_size, output_dir)
        vocab = SHAPES[args.shapes][0].get("vocab_size", 30522)
        batch = make_batch(args.batch, args.seq, device, vocab, pad=True)
        sync = synchronizer(device)
        names = list(steps)
        for _ in range(args.warmup):
            for name in names:
                steps[name](batch)
        times: dict[str, list[float]] = {name: [] for name in names}
        cpu_times: dict[str, list[float]] = {name: [] for name in names}
        memory: dict[str, float] = {name: 0.0 for name in names}
        for index in range(args.rounds):
            shift = index % len(names)
            for name in names[shift:] + names[:shift]:
                reset_peak_memory(device)
                wall, cpu = timed_with_cpu(lambda fn=steps[name]: fn(batch), sync)
                times[name].append(wall)
                cpu_times[name].append(cpu)
                if gpu:
                    memory[name] = max(memory[name], peak_memory_gib(device))
    tokens = args.batch * args.seq
    result = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "device": str(device),
        "machine": machine_facts(device),
        "notes": notes,
        "candidates": {},
    }
    for name in names:
        result["candidates"][name] = {
            "step_s": median(times[name]),
            "tokens_per_s": tokens / median(times[name]),
            "vs_bare": _paired(times, name, "bare"),
            "ours_tinybert_speedup": _paired(times, name, "ours-tinybert"),
            "cpu_s": median(cpu_times[name]),
            "cpu_vs_bare": _paired(cpu_times, name, "bare"),
            "cpu_ours_tinybert_speedup": _paired(cpu_times, name, "ours-tinybert"),
            "gpu_peak_gib": memory[name] if gpu else None,
            "step_times": times[name],
            "cpu_times": cpu_times[name],
        }
    return result


def _paired(times: dict[str, list[float]], name: str, reference: str) -> float:
    """Median over rounds of this candidate's time ÷ the reference's time in the same round."""
    if reference not in times:
        return float("nan")
    return median([a / b for a, b in zip(times[name], times[reference])])


def report(result: dict) -> str:
    cfg = result["config"]
    settings = (
        f"device={result['device']} shapes={cfg['shapes']} batch={cfg['batch']} seq={cfg['seq']} "
        f"teacher={cfg['teacher_dtype']} student={cfg['student_precision']} zero={cfg['zero_stage']} "
        f"rounds={cfg['rounds']} warmup={cfg['warmup']}"
    )
    lines = [format_facts(result["machine"]), settings, ""]
    gpu = result["device"].startswith("cuda")
    cpu = "host CPU" if gpu else "CPU"
    header = [
        "candidate",
        "median step s",
        "tokens/s",
        "time / bare",
        "time / ours-tinybert",
        f"{cpu} s",
        f"{cpu} / bare",
        f"{cpu} / ours-tinybert",
    ]
    if gpu:
        header.append("GPU peak GiB")
    rows = []
    for name, c in result["candidates"].items():
        row = [
            name,
            c["step_s"],
            c["tokens_per_s"],
            c["vs_bare"],
            c["ours_tinybert_speedup"],
            c["cpu_s"],
            c["cpu_vs_bare"],
            c["cpu_ours_tinybert_speedup"],
        ]
        if gpu:
            row.append(c["gpu_peak_gib"])
        rows.append(row)
    lines.append(format_table(header, rows))
    lines += [f"note: {note}" for note in result["notes"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result = run(args)
    print(report(result), flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
