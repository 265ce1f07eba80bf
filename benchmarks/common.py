"""Shared pieces of the benchmark scripts: shapes, models, batches, steps, timing, FLOPs, machine facts.

Scripts in ``benchmarks/`` import this as ``common`` (their own directory is on ``sys.path`` when run
as ``python benchmarks/<script>.py`` or under the ``deepspeed`` launcher). Everything that decides
what a step *is* lives here, so the figures of different scripts are comparable: the same random
BERT-shaped models, the same batch, the same DeepSpeed engine as the trainer builds.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from transformers import BertConfig, BertModel, PretrainedConfig

from mlkd_scale.engine.deepspeed_engine import build_engine
from mlkd_scale.losses import DistillationObjective
from mlkd_scale.models import FeatureTap, build_student, build_student_config
from mlkd_scale.models.distillation_module import MODEL_INPUTS
from mlkd_scale.models.teacher import DTYPES, freeze
from mlkd_scale.spec import LossesSpec, RunSpec, StudentSpec
from mlkd_scale.spec.plan import resolve_plan

#: Model shapes: teacher BertConfig fields and student StudentSpec fields (heads come from a flag).
#: "bert-base" is the issue's BERT-base teacher → 4-layer/312/1200 student (TinyBERT-4's shape);
#: "tiny" exists for smoke tests only.
SHAPES: dict[str, tuple[dict, dict]] = {
    "bert-base": (
        {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
        {"num_layers": 4, "hidden_size": 312, "intermediate_size": 1200},
    ),
    "tiny": (
        {
            "vocab_size": 1000,
            "hidden_size": 48,
            "num_hidden_layers": 4,
            "num_attention_heads": 12,
            "intermediate_size": 96,
            "max_position_embeddings": 64,
        },
        {"num_layers": 2, "hidden_size": 24, "intermediate_size": 48},
    ),
}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def quiet_libraries() -> None:
    """DeepSpeed and transformers print a lot at INFO; the benchmark tables should stay readable."""
    from transformers import logging as hf_logging

    hf_logging.set_verbosity_error()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


# ---- models and batches --------------------------------------------------------------------------


def add_precision_args(parser, student_help: str) -> None:
    """The precision and ZeRO flags that every benchmark script takes."""
    parser.add_argument(
        "--teacher-dtype", choices=["bf16", "fp16", "fp32"], default=None, help="default bf16 on GPU, fp32 on CPU"
    )
    parser.add_argument("--student-precision", choices=["bf16", "fp16", "fp32"], default=None, help=student_help)
    parser.add_argument(
        "--zero-stage", type=int, choices=[0, 1, 2, 3], default=None, help="default 0 on one process, else 2"
    )


def resolve_defaults(args, device: torch.device, world_size: int) -> None:
    """Fill the flags left unset with each device's best setting: batch 64 and bf16 on GPU, batch 8
    and fp32 on CPU; ZeRO 0 on one process (partitioning one rank's state only adds copies), 2 above."""
    gpu = device.type == "cuda"
    args.batch = args.batch or (64 if gpu else 8)
    args.teacher_dtype = args.teacher_dtype or ("bf16" if gpu else "fp32")
    args.student_precision = args.student_precision or ("bf16" if gpu else "fp32")
    if args.zero_stage is None:
        args.zero_stage = 0 if world_size == 1 else 2


def teacher_config(shapes: str) -> BertConfig:
    return BertConfig(**SHAPES[shapes][0])


def student_spec(shapes: str, heads: int) -> StudentSpec:
    return StudentSpec(**SHAPES[shapes][1], num_heads=heads)


def build_models(
    shapes: str,
    device: torch.device | str,
    teacher_dtype: str,
    student_heads: int = 12,
    losses: LossesSpec | None = None,
) -> tuple[BertModel, BertModel, DistillationObjective]:
    """A frozen random teacher, a fresh student and the objective, built the way the trainer builds them.

    Random weights: only shapes matter for time. Both run SDPA; a :class:`FeatureTap` asking for
    attention maps (TinyBERT) computes them explicitly in the mapped layers only.
    """
    device = torch.device(device)
    teacher = freeze(BertModel(teacher_config(shapes))).to(device, DTYPES[teacher_dtype])
    spec = student_spec(shapes, student_heads)
    objective = DistillationObjective(
        losses or LossesSpec(), teacher.config, build_student_config(teacher.config, spec)
    )
    student = build_student(teacher, spec, objective.layer_map).to(device).train()
    objective.to(device)
    return teacher, student, objective


def make_batch(
    batch: int, seq: int, device: torch.device | str, vocab_size: int = 30522, pad: bool = False
) -> dict[str, torch.Tensor]:
    """Random token ids (fixed seed) and an attention mask; ``pad`` blanks half of the first row.

    The trainer packs sequences full, so throughput runs use ``pad=False``; loss-cost comparisons
    use some padding so that the masked code paths run too.
    """
    g = torch.Generator().manual_seed(0)
    low, high = min(1000, vocab_size // 4), min(30000, vocab_size)
    out = {
        "input_ids": torch.randint(low, high, (batch, seq), generator=g).to(device),
        "attention_mask": torch.ones(batch, seq, dtype=torch.long, device=device),
    }
    if pad:
        out["attention_mask"][0, seq // 2 :] = 0
    return out


# ---- steps ---------------------------------------------------------------------------------------


def bare_step(teacher, student, batch) -> None:
    """The floor of any distillation step: teacher forward, student forward/backward, trivial loss."""
    with torch.no_grad():
        teacher(**batch)
    loss = student(**batch).last_hidden_state.float().square().mean()
    loss.backward()


LOG_EVERY = 10  # the trainer's default logging.every_n_steps


def make_engine(
    module: nn.Module,
    batch: int,
    seq: int,
    precision: str,
    zero_stage: int,
    world_size: int,
):
    """A DeepSpeed engine over ``module`` (a ``DistillationModule``) as the trainer builds it:
    spec → plan → DeepSpeed config, and the project's AdamW + LR schedule.

    The spec holds only what the engine reads (micro batch, precision, ZeRO stage, optimizer
    defaults); the teacher path and data source are placeholders that are never opened.
    """
    spec = RunSpec(
        teacher={"path": "unused"},
        data={"sources": [{"path": "unused"}], "max_seq_length": seq},
        train={
            "micro_batch_size": batch,
            "max_steps": 10**6,
            "warmup_steps": 0,
            "precision": precision,
            "zero_stage": zero_stage,
        },
    )
    engine, _ = build_engine(module, spec.train, resolve_plan(spec, world_size))
    engine.train()
    return engine


def make_engine_step(engine, teacher_tap: FeatureTap) -> Callable[[dict], None]:
    """One micro step of :meth:`Trainer.train_step`: teacher taps, engine forward, backward, step.

    Like the trainer, the loss terms are summed on the device for the next logging point (no
    host sync); the sums are dropped after ``LOG_EVERY`` steps instead of being logged.
    """
    sums: dict[str, torch.Tensor] = {}

    def step(batch: dict) -> None:
        model_batch = {k: batch[k] for k in MODEL_INPUTS if k in batch}
        with torch.no_grad():
            teacher_features = teacher_tap(**model_batch)
        total, terms = engine(model_batch, teacher_features)
        engine.backward(total)
        engine.step()
        for name, value in {"total": total.detach(), **terms}.items():
            sums[name] = sums.get(name, 0) + value.float()
        if engine.global_steps % LOG_EVERY == 0:
            sums.clear()

    return step


# ---- timing --------------------------------------------------------------------------------------


def synchronizer(device: torch.device | str) -> Callable[[], None]:
    return torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)


def timed(fn, sync) -> float:
    """Seconds for ``fn()``, with the device drained before and after."""
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def timed_with_cpu(fn, sync) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) for ``fn()``, with the device drained before and after.

    CPU time counts every thread of this process and nothing of other processes, so on a busy
    machine it is a steadier measure of a CPU step's cost than wall time (with one torch thread it
    equals the wall time of a quiet machine, less memory-bandwidth contention). On GPU it is the
    host-side cost of the step.
    """
    sync()
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    sync()
    return time.perf_counter() - wall, time.process_time() - cpu


def median(values: list[float]) -> float:
    return statistics.median(values)


def reset_peak_memory(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device | str) -> float:
    """GPU: peak allocated since the last reset. CPU: the process's peak RSS (ru_maxrss, whole life)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def memory_kind(device: torch.device | str) -> str:
    return "GPU peak allocated" if torch.device(device).type == "cuda" else "process peak RSS"


# ---- FLOPs ---------------------------------------------------------------------------------------


def encoder_forward_flops(config: PretrainedConfig, seq_len: int, pooler: bool = True) -> int:
    """Matmul FLOPs of one BERT forward over one sequence of ``seq_len`` tokens (2 FLOPs per multiply-add).

    With N layers, width d, FFN width f and L = seq_len, per token and layer:

        2·(4·d² + 2·d·f)   Q, K, V and output projections (4·d² weights) and the two FFN matmuls
                           (2·d·f weights): 2 × the layer's matmul parameters
      + 4·L·d              attention: scores Q·Kᵀ (2·L·d) and probabilities × V (2·L·d)

    so one sequence costs  L·N·(8d² + 4df + 4Ld),  plus 2·d² for the pooler's dense layer on [CLS]
    when the model has one. Embedding look-ups, biases, LayerNorm, softmax, GELU, the
    student→teacher projections and the losses are not counted, so MFU is slightly understated.
    """
    n, d, f = config.num_hidden_layers, config.hidden_size, config.intermediate_size
    per_token_layer = 8 * d * d + 4 * d * f + 4 * seq_len * d
    return seq_len * n * per_token_layer + (2 * d * d if pooler else 0)


def distillation_step_flops(
    t_config: PretrainedConfig, s_config: PretrainedConfig, batch: int, seq_len: int
) -> int:
    """Model FLOPs of one distillation step: teacher forward + 3 × student forward (forward + backward)."""
    return batch * (encoder_forward_flops(t_config, seq_len) + 3 * encoder_forward_flops(s_config, seq_len))


def measure_matmul_tflops(
    device: torch.device | str, dtype: torch.dtype, size: int, iters: int = 10
) -> float:
    """Achieved TFLOP/s of a square ``size``×``size`` matmul: the practical peak of the device."""
    device = torch.device(device)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    sync = synchronizer(device)
    for _ in range(3):
        a @ b
    times = [timed(lambda: a @ b, sync) for _ in range(iters)]
    return 2 * size**3 / median(times) / 1e12


# ---- launching runs ------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]


def python_env(threads: int) -> dict[str, str]:
    """The environment of a launched run: this checkout's package first, CPU DeepSpeed without a GPU."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(REPO))
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
    return env


def run_quietly(args: list[str], log: Path, env: dict[str, str]) -> None:
    """Run one launcher in the repository root; its output goes to ``log``, whose tail is shown if it fails."""
    with log.open("w") as f:
        proc = subprocess.run(args, check=False, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    if proc.returncode:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"{' '.join(args)} failed (exit {proc.returncode}); the end of {log}:\n{tail}")


# ---- machine facts -------------------------------------------------------------------------------


def machine_facts(device: torch.device | str) -> dict[str, str]:
    """What the figures were measured on (printed with every table, copied into docs/performance.md)."""
    import deepspeed
    import transformers

    facts = {
        "date": time.strftime("%Y-%m-%d"),
        "host": platform.node(),
        "cpu": _lscpu_model(),
        "cpus": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
        "load_avg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "deepspeed": deepspeed.__version__,
    }
    if torch.device(device).type == "cuda":
        facts["gpu"] = torch.cuda.get_device_name(device)
        facts["nvidia_smi"] = _nvidia_smi()
    return facts


def _lscpu_model() -> str:
    if shutil.which("lscpu"):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _nvidia_smi() -> str:
    if not shutil.which("nvidia-smi"):
        return "nvidia-smi not found"
    query = "name,driver_version,memory.total,clocks.max.sm,power.limit"
    out = subprocess.run(
        ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        check=False,
    )
    return out.stdout.strip() or out.stderr.strip()


def format_facts(facts: dict[str, str]) -> str:
    return " | ".join(f"{k}={v}" for k, v in facts.items())


def format_table(header: list[str], rows: list[list]) -> str:
    """A plain fixed-width table (first column left-aligned, the rest right-aligned)."""
    cells = [header] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = []
    for index, row in enumerate(cells):
        parts = [row[0].ljust(widths[0])] + [row[i].rjust(widths[i]) for i in range(1, len(row))]
        lines.append("  ".join(parts))
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(value) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.2f}" if abs(value) >= 10 else f"{value:.4f}"
    return str(value)
