"""Every random number generator a training step draws from, captured per rank for its checkpoint."""

from __future__ import annotations

import random

import numpy as np
import torch


def capture_rng_state() -> dict:
    """Every RNG a training step may draw from (dropout, shuffling, augmentation), for rank_state.

    Plain values and tensors only, so that rank_state loads with ``weights_only=True`` (numpy's
    state array becomes an int64 tensor). Only the current CUDA device is captured: each rank owns
    one device, and touching the others would create a CUDA context on every GPU from every rank.
    """
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": str(name),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch_cpu": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["bit_generator"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch_cpu"])
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["torch_cuda"])
