"""Process-group setup that works under the deepspeed launcher, torchrun, and plain python."""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_s: float | None = None) -> DistInfo:
    """Join (or, for a single plain-python process, create) the process group.

    The deepspeed launcher and torchrun set RANK/LOCAL_RANK/WORLD_SIZE/MASTER_*; a plain ``python``
    run gets a world of one on a free local port. The backend is the accelerator's own
    (NCCL on CUDA, gloo or oneCCL on CPU). ``timeout_s`` (the spec's ``faults.collective_timeout_s``)
    bounds every collective, so a rank whose peer died fails instead of hanging.
    """
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if accelerator.device_name() != "cpu":
        accelerator.set_device(local_rank)
    timeout = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
    deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name(), **timeout)
    device = torch.device(accelerator.device_name(local_rank) if accelerator.device_name() != "cpu" else "cpu")
    return DistInfo(
        rank=torch.distributed.get_rank(),
        local_rank=local_rank,
        world_size=torch.distributed.get_world_size(),
        device=device,
    )
