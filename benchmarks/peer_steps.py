"""One training step of each peer in ``peers.py``: TinyBERT's losses by hand from Hugging Face's
outputs, TextBrewer's ``GeneralDistiller``, the bare steps and our engine's step."""

from __future__ import annotations

from collections.abc import Callable

import torch
from common import (
    bare_step,
    make_engine,
    make_engine_step,
)
from torch import nn
from transformers.masking_utils import AttentionMaskInterface, eager_mask
from transformers.modeling_utils import AttentionInterface

from mlkd_scale.engine.schedule import build_optimizer
from mlkd_scale.losses import DistillationObjective
from mlkd_scale.models import FeatureTap
from mlkd_scale.models.distillation_module import DistillationModule
from mlkd_scale.spec import LossesSpec, TrainSpec

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
