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
    bare_step,
    build_models,
    format_facts,
    format_table,
    machine_facts,
    make_batch,
    make_engine,
    make_engine_step,
    median,
    peak_memory_gib,
    quiet_libraries,
    reset_peak_memory,
    resolve_defaults,
    synchronizer,
    timed_with_cpu,
)
from torch import nn
from transformers.masking_utils import AttentionMaskInterface, eager_mask
from transformers.modeling_utils import AttentionInterface

from mlkd_scale.engine.distributed import init_distributed
from mlkd_scale.engine.schedule import build_optimizer
from mlkd_scale.losses import DistillationObjective
from mlkd_scale.models import FeatureTap, resolve_layer_mapping
from mlkd_scale.models.distillation_module import DistillationModule
from mlkd_scale.spec import LossesSpec, TrainSpec

CANDIDATES = ("bare", "bare-eager", "bare-engine", "ours-tinybert", "ours-mlkd", "hf-loop", "textbrewer")
GRAD_CLIP = 1.0  # TrainSpec's default, which the DeepSpeed engine applies too


# ---- TinyBERT's losses by hand, from Hugging Face's output tuples --------------------------------

#: An attention implementation a user would register to get TinyBERT's unnormalised scores out of
#: ``output_attentions=True``: Hugging Face's eager attention, returning the scores before the softmax.
EAGER_SCORES = "eager_scores"


def eager_scores_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """BERT's eager attention (transformers' ``eager_attention_forward``) that returns, as its
    attention weights, the scores QKᵀ/√d_k + additive mask [B, H, L, L] instead of the probabilities."""
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = nn.functional.dropout(torch.softmax(scores, dim=-1), p=dropout, training=module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), scores


AttentionInterface.register(EAGER_SCORES, eager_scores_attention_forward)
AttentionMaskInterface.register(EAGER_SCORES, eager_mask)


def zeroed_mse(student: torch.Tensor, teacher: torch.Tensor, below: float = -100.0) -> torch.Tensor:
    """TinyBERT's attention MSE: entries ≤ ``below`` set to 0 on both sides, then ``nn.MSELoss()``."""
    student = torch.where(student <= below, torch.zeros_like(student), student)
    teacher = torch.where(teacher <= below, torch.zeros_like(teacher), teacher)
    return nn.MSELoss()(student.float(), teacher.float())


def tinybert_reference_losses(
    t_hidden: tuple[torch.Tensor, ...],
    t_scores: tuple[torch.Tensor, ...],
    s_hidden: tuple[torch.Tensor, ...],
    s_scores: tuple[torch.Tensor, ...],
    fit_dense: nn.Module,
    layer_map: list[int],
) -> dict[str, torch.Tensor]:
    """TinyBERT's stage-1 losses as its task_distill.py computes them, against ``output_hidden_states``
    and the scores of ``output_attentions`` under :data:`EAGER_SCORES`: ``hidden[0]`` is the embedding
    output, ``hidden[n]`` layer n's output, ``scores[n-1]`` layer n's scores; one ``fit_dense`` maps
    every student state; ``layer_map[n-1]`` is the teacher layer of student layer n. Plain
    ``nn.MSELoss()`` over every element (padding included, as the official code).
    Returns the unweighted ``emb``, ``hidden`` (summed over layers) and ``attn`` (summed) terms.
    """
    mse = nn.MSELoss()
    pairs = list(enumerate(layer_map, start=1))
    return {
        "emb": mse(fit_dense(s_hidden[0]).float(), t_hidden[0].float()),
        "hidden": sum(mse(fit_dense(s_hidden[n]).float(), t_hidden[m].float()) for n, m in pairs),
        "attn": sum(zeroed_mse(s_scores[n - 1], t_scores[m - 1]) for n, m in pairs),
    }


# ---- TextBrewer ----------------------------------------------------------------------------------


def textbrewer_matches(layer_map: list[int], d_student: int, d_teacher: int) -> list[dict]:
    """TinyBERT's losses as TextBrewer intermediate matches (the order fixes ``distiller.projs``:
    index 0 the embeddings, index n student layer n). TextBrewer gives each match its own
    projection (TinyBERT shares one ``fit_dense``; the step costs the same), and its
    ``attention_mse`` zeroes every score ≤ −1e-3 (TinyBERT: ≤ −100), which changes the attention
    term's value, not its cost."""
    proj = ["linear", d_student, d_teacher]
    matches = [
        {"layer_T": 0, "layer_S": 0, "feature": "hidden", "loss": "hidden_mse", "weight": 1, "proj": proj}
    ]
    pairs = list(enumerate(layer_map, start=1))
    matches += [
        {
            "layer_T": m,
            "layer_S": n,
            "feature": "hidden",
            "loss": "hidden_mse",
            "weight": 1,
            "proj": list(proj),
        }
        for n, m in pairs
    ]
    matches += [
        {"layer_T": m - 1, "layer_S": n - 1, "feature": "attention", "loss": "attention_mse", "weight": 1}
        for n, m in pairs
    ]
    return matches


def textbrewer_adaptor(batch: dict, outputs) -> dict:
    """TextBrewer adaptor for a Hugging Face encoder run with hidden states and :data:`EAGER_SCORES`
    attention; no ``inputs_mask``, so its losses average over every position as TinyBERT's do."""
    return {"hidden": outputs.hidden_states, "attention": outputs.attentions}


def textbrewer_fp32_adaptor(batch: dict, outputs) -> dict:
    """The teacher's adaptor when it runs in half precision and the student in fp32.

    TextBrewer's ``F.mse_loss`` needs one dtype on both sides; the upcast is user glue code.
    """
    return {
        "hidden": tuple(h.float() for h in outputs.hidden_states),
        "attention": tuple(a.float() for a in outputs.attentions),
    }


def build_textbrewer(
    teacher, student, layer_map: list[int], device: torch.device, output_dir: str, upcast: bool
):
    """A ``GeneralDistiller`` with TinyBERT's matches; its projections are in ``distiller.projs``."""
    from textbrewer import DistillationConfig, GeneralDistiller, TrainingConfig

    train_config = TrainingConfig(device=device, output_dir=output_dir, log_dir=None)
    distill_config = DistillationConfig(
        intermediate_matches=textbrewer_matches(
            layer_map, student.config.hidden_size, teacher.config.hidden_size
        )
    )
    adaptor_t = textbrewer_fp32_adaptor if upcast else textbrewer_adaptor
    return GeneralDistiller(train_config, distill_config, teacher, student, adaptor_t, textbrewer_adaptor)


# ---- the candidates' steps -----------------------------------------------------------------------


def _optimizer(module: nn.Module, train: TrainSpec, device: torch.device):
    return build_optimizer(module, train, total_steps=10**6, warmup_steps=0)


def _update(optimizer, scheduler, params) -> None:
    torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def make_bare(teacher, student, train, device, autocast) -> Callable[[dict], None]:
    optimizer, scheduler = _optimizer(student, train, device)

    def step(batch):
        with autocast():
            bare_step(teacher, student, batch)
        _update(optimizer, scheduler, student.parameters())

    return step


def make_hf_loop(teacher, student, layer_map, train, device, autocast) -> Callable[[dict], None]:
    d_s, d_t = student.config.hidden_size, teacher.config.hidden_size
    fit_dense = nn.Linear(d_s, d_t).to(device)  # TinyBERT's one projection for every student state
    trained = nn.ModuleList([student, fit_dense])
    optimizer, scheduler = _optimizer(trained, train, device)
    outputs = {"output_hidden_states": True, "output_attentions": True}

    def step(batch):
        with torch.no_grad():
            t = teacher(**batch, **outputs)
        with autocast():
            s = student(**batch, **outputs)
            terms = tinybert_reference_losses(
                t.hidden_states, t.attentions, s.hidden_states, s.attentions, fit_dense, layer_map
            )
        total = terms["emb"] + terms["hidden"] + terms["attn"]
        total.backward()
        _update(optimizer, scheduler, trained.parameters())

    return step


def make_textbrewer(teacher, student, layer_map, train, device, autocast, output_dir, upcast):
    distiller = build_textbrewer(teacher, student, layer_map, device, output_dir, upcast)
    optimizer, _ = _optimizer(student, train, device)
    # adds the projections' parameter groups (and would wrap DDP/apex, both off here)
    optimizer, _, _ = distiller.initialize_training(optimizer, None, None, None)
    student.train()
    outputs = {"output_hidden_states": True, "output_attentions": True}

    def step(batch):  # the body of BasicDistiller.train_with_num_steps, one batch, no accumulation
        with autocast():
            total_loss, losses = distiller.train_on_batch(batch, outputs)
        distiller.write_loss(total_loss, 0, losses)
        total_loss /= distiller.t_config.gradient_accumulation_steps
        total_loss.backward()
        torch.nn.utils.clip_grad_norm_(distiller.model_S.parameters(), GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad()

    return step


class _BareModule(nn.Module):
    """The student with the bare step's trivial loss, so a DeepSpeed engine can wrap it."""

    def __init__(self, student: nn.Module):
        super().__init__()
        self.student = student

    def forward(self, batch: dict) -> torch.Tensor:
        return self.student(**batch).last_hidden_state.float().square().mean()


def make_bare_engine(teacher, student, args, world_size) -> Callable[[dict], None]:
    engine = make_engine(
        _BareModule(student),
        args.batch,
        args.seq,
        args.student_precision,
        args.zero_stage,
        world_size,
    )

    def step(batch):
        with torch.no_grad():
            teacher(**batch)
        loss = engine(batch)
        engine.backward(loss)
        engine.step()

    return step


def make_ours(teacher, student, preset, args, device, world_size) -> Callable[[dict], None]:
    """Our engine step (the taps compute TinyBERT's attention maps in the mapped layers only)."""
    objective = DistillationObjective(LossesSpec(preset=preset), teacher.config, student.config).to(device)
    tap = FeatureTap(teacher, objective.teacher_request())
    engine = make_engine(
        DistillationModule(student, objective),
        args.batch,
        args.seq,
        args.student_precision,
        args.zero_stage,
        world_size,
    )
    return make_engine_step(engine, tap)


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
