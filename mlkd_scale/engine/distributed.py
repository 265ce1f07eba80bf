"""Process-group setup that works under the deepspeed launcher, torchrun, and plain python."""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch

from mlkd_scale.engine.host_memory import keep_freed_memory


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
    (NCCL on CUDA, gloo or oneCCL on CPU); a CPU rank's ``malloc`` keeps freed memory for the next step
    (:mod:`~mlkd_scale.engine.host_memory`). ``timeout_s`` (the spec's ``faults.collective_timeout_s``)
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
    if device.type == "cpu":
        _unlink_shm_buffer()
        keep_freed_memory()
    return DistInfo(
        rank=torch.distributed.get_rank(),
        local_rank=local_rank,
        world_size=torch.distributed.get_world_size(),
        device=device,
    )


def _unlink_shm_buffer() -> None:
    """Remove this rank's name of DeepSpeed's CPU all-reduce buffer from ``/dev/shm``.

    DeepSpeed's shm comm op creates a 69 MB ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>``
    per rank while the process group starts, maps every rank's buffer, and never unlinks them: each
    CPU run left 69 MB per rank in the RAM-backed ``/dev/shm`` (18 GB after a day of tests here).
    Once every rank is past the start (the barrier), all buffers are mapped, so each rank unlinks
    its own name: the mappings stay valid until the process exits, and even a killed run leaks
    nothing.
    """
    torch.distributed.barrier()
    name = "_".join(
        [
            "deepspeed_allreduce_buffer",
            str(os.getuid()),
            os.environ.get("MASTER_ADDR", ""),
            os.environ.get("MASTER_PORT", ""),
            str(torch.distributed.get_rank()),
        ]
    )
    try:
        os.unlink(os.path.join("/dev/shm", name))
    except FileNotFoundError:  # no shm op (e.g. ranks on several hosts): nothing was created
        pass


def barrier() -> None:
    """``dist.barrier()`` when a process group exists (one process: nothing to wait for)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def gather_to_all(value):
    """Every rank's ``value`` (picklable) as a list in rank order; ``[value]`` without a process group."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [value]
    values = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(values, value)
    return values


def from_rank0(value):
    """Rank 0's ``value`` (picklable) on every rank; also a barrier. ``value`` without a process group."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]
