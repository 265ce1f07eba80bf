"""Tiny DeepSpeed engines for the checkpoint/export tests (in-process) and the 2-rank script.

The wrapper mirrors the project's trainable module: ``student`` (a HF model) and ``objective``
(trainable projections), so state dict keys look like ``student.*`` and ``objective.*``.
"""

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import socket

import deepspeed
import torch
import torch.distributed as dist
from torch import nn
from transformers import BertConfig, BertModel

VOCAB = 100


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_single_process() -> None:
    """A 1-rank gloo process group in this process (idempotent: other test modules may have one)."""
    if dist.is_initialized():
        return
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    deepspeed.init_distributed(dist_backend="gloo")


def tiny_config(vocab_size: int = VOCAB) -> BertConfig:
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )


class Wrapper(nn.Module):
    def __init__(self, student: nn.Module):
        super().__init__()
        self.student = student
        hidden = student.config.hidden_size
        self.objective = nn.ModuleDict({"projections": nn.ModuleList([nn.Linear(hidden, 48)])})

    def forward(self, input_ids):
        out = self.student(input_ids=input_ids, output_hidden_states=True)
        return self.objective["projections"][0](out.hidden_states[-1]).pow(2).mean()


def make_engine(stage: int, seed: int, bf16: bool = False, student_cls=BertModel, vocab_size: int = VOCAB):
    """A DeepSpeed engine over a fresh random wrapper, with AdamW and a step-dependent lr schedule."""
    torch.manual_seed(seed)
    model = Wrapper(student_cls(tiny_config(vocab_size)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
    }
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config
    )
    return engine


def batch(i: int, vocab_size: int = VOCAB) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + i)
    return torch.randint(1, vocab_size, (2, 8), generator=g)


def train_step(engine, input_ids: torch.Tensor) -> float:
    loss = engine(input_ids)
    engine.backward(loss)
    engine.step()
    return loss.item()


def full_state(engine) -> dict[str, torch.Tensor]:
    """Copies of every parameter, gathered if ZeRO-3 has partitioned them."""
    params = dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        return {name: p.detach().clone() for name, p in params.items()}
