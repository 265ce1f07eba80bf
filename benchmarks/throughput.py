"""Throughput of one general-distillation step: tokens/s, samples/s, peak memory, and MFU.

A step is one micro step of :meth:`mlkd_scale.engine.general_kd.Trainer.train_step`, built from the
project's own pieces: the teacher's forward under ``no_grad`` through a :class:`FeatureTap` with the
objective's request, then the DeepSpeed engine (``deepspeed.initialize`` on a
:class:`DistillationModule` with the ZeRO config the spec → plan path produces) doing the student's
forward with its taps and the :class:`DistillationObjective`, ``engine.backward`` and ``engine.step``
(the ZeRO optimizer step, gradient clipping, the LR schedule). Data loading is not part of it: the
same random batch, full (the trainer packs sequences full, so no padding), every step.

Shapes: a BERT-base-shaped teacher (12 layers, 768 wide, 12 heads, FFN 3072) and a 4-layer, 312 wide,
12-head, FFN-1200 student, sequence 128, random weights (only shapes matter for time). The teacher
runs in bf16 on GPU and fp32 on CPU; the student's precision is DeepSpeed's (``--student-precision``).

Warm-up steps, then ``--steps`` timed steps with the device drained around each; the median is
reported, with the median process CPU time per step (steadier than wall time on a busy CPU
machine; on GPU the host-side cost). Under the ``deepspeed`` launcher every rank times its own
steps and rank 0 prints a row per rank and the aggregate (the sum of the ranks' tokens/s).

MFU = (teacher forward FLOPs + 3 × student forward FLOPs) per step / median step seconds / peak,
counting matmuls only (see :func:`common.encoder_forward_flops`). Per sequence of L tokens a BERT
forward with N layers, width d and FFN width f costs

    L·N·(8d² + 4df + 4Ld) + 2d²        (2·matmul params per token, attention 4·L·d per token and
                                        layer, the pooler's d×d on [CLS])

which is 22.35 GFLOP for the teacher and 1.25 GFLOP for the student at L = 128. The peak is
``--peak-tflops`` when given; a large matmul on the device (bf16 on GPU, fp32 on CPU) is always
measured too, and MFU is reported against both.

    .venv/bin/python benchmarks/throughput.py --steps 20                     # one process
    DS_ACCELERATOR=cpu .venv/bin/deepspeed --num_gpus 2 benchmarks/throughput.py --steps 10
    deepspeed --num_gpus 8 benchmarks/throughput.py --batch 64 --peak-tflops 989   # H100 bf16 dense

The device is DeepSpeed's accelerator (``DS_ACCELERATOR=cpu`` forces the CPU).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from common import (
    SHAPES,
    add_precision_args,
    build_models,
    distillation_step_flops,
    format_facts,
    format_table,
    machine_facts,
    make_batch,
    make_engine,
    make_engine_step,
    measure_matmul_tflops,
    median,
    memory_kind,
    peak_memory_gib,
    quiet_libraries,
    reset_peak_memory,
    resolve_defaults,
    synchronizer,
    timed_with_cpu,
)

from mlkd_scale.engine.distributed import init_distributed
from mlkd_scale.losses.presets import PRESETS
from mlkd_scale.models import FeatureTap
from mlkd_scale.models.distillation_module import DistillationModule
from mlkd_scale.spec import LossesSpec


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--batch", type=int, default=None, help="micro batch per rank (default 64 on GPU, 8 on CPU)"
    )
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="timed steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--shapes", choices=list(SHAPES), default="bert-base", help="'tiny' is for smoke tests"
    )
    # A preset whose Stage 1 reads masked-LM predictions (distilbert) needs MLM-head models and masked
    # batches, which this script's random models and batches do not have: it is not offered here.
    plain = sorted(name for name, preset in PRESETS.items() if not preset.masked_lm_terms.get(1))
    parser.add_argument("--preset", choices=plain, default="mlkd", help="the losses.preset (Stage 1)")
    parser.add_argument("--student-heads", type=int, default=12)
    add_precision_args(parser, "DeepSpeed mixed precision of the student (default bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the student and the objective")
    parser.add_argument("--compile-teacher", action="store_true", help="torch.compile the teacher too")
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak TFLOP/s of one device for MFU")
    parser.add_argument("--no-measure-peak", action="store_true", help="skip the matmul peak measurement")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads per process (default: torch's own choice)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here (rank 0)")
    parser.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # set by the launcher
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    """Build, warm up, time; returns every rank's figures (the same dict on every rank)."""
    import deepspeed

    quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    dist = init_distributed()
    device = dist.device
    resolve_defaults(args, device, dist.world_size)
    gpu = device.type == "cuda"
    deepspeed.runtime.utils.set_random_seed(args.seed)  # the same student on every rank

    teacher, student, objective = build_models(
        args.shapes, device, args.teacher_dtype, args.student_heads, LossesSpec(preset=args.preset)
    )
    teacher_tap = FeatureTap(teacher, objective.teacher_request())
    module = DistillationModule(student, objective)
    if args.compile:
        student.compile()
        objective.compile()
    if args.compile_teacher:
        teacher.compile()
    engine = make_engine(
        module, args.batch, args.seq, args.student_precision, args.zero_stage, dist.world_size
    )
    step = make_engine_step(engine, teacher_tap)
    batch = make_batch(args.batch, args.seq, device, teacher.config.vocab_size)
    sync = synchronizer(device)

    for _ in range(args.warmup):
        step(batch)
    sync()
    reset_peak_memory(device)
    walls_and_cpus = [timed_with_cpu(lambda: step(batch), sync) for _ in range(args.steps)]
    times = [wall for wall, _ in walls_and_cpus]
    peak_mem = peak_memory_gib(device)
    measured_peak = None
    if not args.no_measure_peak:
        measured_peak = measure_matmul_tflops(
            device, torch.bfloat16 if gpu else torch.float32, size=8192 if gpu else 2048
        )

    step_s = median(times)
    flops = distillation_step_flops(teacher.config, student.config, args.batch, args.seq)
    mine = {
        "rank": dist.rank,
        "step_s": step_s,
        "tokens_per_s": args.batch * args.seq / step_s,
        "samples_per_s": args.batch / step_s,
        "peak_mem_gib": peak_mem,
        "model_tflops": flops / step_s / 1e12,
        "measured_peak_tflops": measured_peak,
        "cpu_s": median([cpu for _, cpu in walls_and_cpus]),
        "threads": torch.get_num_threads(),
        "step_times": times,
    }
    ranks: list[dict] = [None] * dist.world_size  # type: ignore[list-item]
    torch.distributed.all_gather_object(ranks, mine)
    result = {
        "config": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "local_rank"
        },
        "world_size": dist.world_size,
        "device": str(device),
        "memory_kind": memory_kind(device),
        "step_flops": flops,
        "machine": machine_facts(device),
        "ranks": ranks,
        "tokens_per_s": sum(r["tokens_per_s"] for r in ranks),
        "samples_per_s": sum(r["samples_per_s"] for r in ranks),
        "model_tflops": sum(r["model_tflops"] for r in ranks),
    }
    teacher_tap.remove()
    return result


def mfu(tflops: float, peak: float | None) -> float:
    return tflops / peak if peak else float("nan")


def report(result: dict) -> str:
    cfg = result["config"]
    settings = (
        f"device={result['device']} world={result['world_size']} shapes={cfg['shapes']} "
        f"preset={cfg['preset']} batch/rank={cfg['batch']} seq={cfg['seq']} teacher={cfg['teacher_dtype']} "
        f"student={cfg['student_precision']} zero={cfg['zero_stage']} compile={cfg['compile']} "
        f"steps={cfg['steps']} warmup={cfg['warmup']} "
        f"model FLOP/step/rank={result['step_flops'] / 1e9:,.1f} G"
    )
    lines = [format_facts(result["machine"]), settings, ""]
    peak = cfg["peak_tflops"]
    cpu = "host CPU s" if result["device"].startswith("cuda") else "CPU s"
    header = [
        "rank",
        "median step s",
        cpu,
        "tokens/s",
        "samples/s",
        f"{result['memory_kind']} GiB",
        "model TFLOP/s",
        "matmul peak TFLOP/s",
        "MFU (matmul)",
        "MFU (--peak-tflops)",
    ]
    rows = []
    for r in result["ranks"]:
        measured = r["measured_peak_tflops"]
        rows.append(
            [
                str(r["rank"]),
                r["step_s"],
                r["cpu_s"],
                r["tokens_per_s"],
                r["samples_per_s"],
                r["peak_mem_gib"],
                r["model_tflops"],
                measured if measured else float("nan"),
                mfu(r["model_tflops"], measured),
                mfu(r["model_tflops"], peak),
            ]
        )
    if result["world_size"] > 1:
        world = result["world_size"]
        measured = [r["measured_peak_tflops"] for r in result["ranks"] if r["measured_peak_tflops"]]
        total_measured = sum(measured) if len(measured) == world else None
        rows.append(
            [
                "all",
                max(r["step_s"] for r in result["ranks"]),
                float("nan"),
                result["tokens_per_s"],
                result["samples_per_s"],
                max(r["peak_mem_gib"] for r in result["ranks"]),
                result["model_tflops"],
                total_measured or float("nan"),
                mfu(result["model_tflops"], total_measured),
                mfu(result["model_tflops"], peak and peak * world),
            ]
        )
    lines.append(format_table(header, rows))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result = run(args)
    if torch.distributed.get_rank() == 0:
        print(report(result), flush=True)
        if args.json:
            args.json.write_text(json.dumps(result, indent=1))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
