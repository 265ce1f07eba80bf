"""Resuming a general-distillation run at another world size (e.g. 2 ranks -> 1, 1 -> 2).

The run must know before it builds its engine, so :func:`prepare_resume` runs first and decides:

* **Model, optimizer, lr schedule** (DeepSpeed): a ZeRO-1/2/3 checkpoint is sharded by rank, so at a
  new world size rank 0 converts the checkpoint once into DeepSpeed's *universal* form
  (``deepspeed.checkpoint.ds_to_universal``: one fp32 / exp_avg / exp_avg_sq file per parameter)
  in ``<tag>/universal`` (written to a temporary directory and renamed, so it is whole or absent;
  a later resume reuses it); the other ranks wait. The engine is then built with DeepSpeed's
  ``checkpoint: {load_universal: true}`` and loads it (each rank takes its new partition). The lr
  scheduler and the client state (step, tokens seen, loss history) come from the copied
  ``mp_rank_00`` / ``zero_pp_rank_0`` model-states file, as in a normal load. At the same world
  size nothing changes: the normal checkpoint is loaded.
* **Data position**: the corpus is split into world-size independent stream shards
  (:mod:`mlkd_scale.data.corpus.stream_shards`); each rank file of the checkpoint holds the positions of
  the shards its rank read, and a new rank collects its shards' positions from the old rank files
  that hold them (:func:`~mlkd_scale.data.corpus.stream_shards.regroup`).
* **RNG** (dropout): new rank ``r`` takes old rank ``r``'s generator states when that rank existed;
  a rank that did not exist gets seeds derived from ``(run.seed, rank, step)``
  (:func:`derived_seed`), so a resumed run is still reproducible.

DeepSpeed 0.19.8 converts ZeRO stages 1, 2 and 3 (data parallel); its ZeRO-3 universal load needs
two repairs (:func:`repair_zero3_universal_load`). A ZeRO-0 checkpoint needs no conversion: rank 0
wrote the whole model and optimizer state into one file that every rank loads, whatever the world
size. A pretokenized corpus (``data.pretokenized_dir``) keeps one global position, the same in every
rank file, which any new rank takes over.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from deepspeed.runtime.utils import set_random_seed

from mlkd_scale.data.corpus.pretokenized import PretokenizedStream
from mlkd_scale.data.corpus.stream_shards import (
    ShardedStream,
    check_world_size,
    owned_shards,
    regroup,
    shard_states,
)
from mlkd_scale.engine.checkpoints.files import fsync_dir, rank_state_name
from mlkd_scale.engine.checkpoints.manager import (
    CheckpointError,
    CheckpointManager,
    read_complete,
    strip_deepspeed_keys,
)
from mlkd_scale.engine.checkpoints.rng_state import capture_rng_state
from mlkd_scale.engine.checkpoints.safe_load import install_checkpoint_engine, load_plain, plain_data_only
from mlkd_scale.engine.distributed import from_rank0
from mlkd_scale.errors import DataError
from mlkd_scale.spec import RunSpec
from mlkd_scale.spec.plan import Plan

log = logging.getLogger(__name__)

UNIVERSAL = "universal"  # <tag>/universal: the universal form of checkpoint <tag>


def read_rank_state(tag_dir: Path, rank: int) -> dict:
    """Rank ``rank``'s state file of checkpoint ``tag_dir`` (plain data only; verified by resume)."""
    return load_plain(Path(tag_dir) / rank_state_name(rank))


def derived_seed(seed: int, rank: int, step: int) -> int:
    """The RNG seed of a rank that did not exist before a resume at step ``step`` (32 bits)."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])


def has_zero_shards(tag_dir: Path) -> bool:
    """Whether checkpoint ``tag_dir`` holds ZeRO optimizer shards (ZeRO-1/2/3; ZeRO-0 has none)."""
    return any(Path(tag_dir).glob("*optim_states.pt"))


def ensure_universal(tag_dir: Path, rank: int) -> Path:
    """``<tag>/universal``, converted by rank 0 if it is not there yet. Collective."""
    target = Path(tag_dir) / UNIVERSAL
    error = None
    if rank == 0 and not target.is_dir():
        try:
            convert_to_universal(tag_dir, target)
        except Exception as exc:  # every rank must hear of it, not hang at the next collective
            log.exception("universal conversion of %s failed", tag_dir)
            error = f"converting {tag_dir} to a universal checkpoint failed ({type(exc).__name__}: {exc})"
    error = from_rank0(error)
    if error is not None:
        raise CheckpointError(
            error + "; resume with the world size the checkpoint was saved at, or start a new run"
        )
    return target


def convert_to_universal(tag_dir: Path, target: Path) -> None:
    """DeepSpeed's ``ds_to_universal`` of ``tag_dir`` into ``target``, atomically (temp dir + rename).

    In this process and serially (one worker: no process pool forked from a training rank). Its
    progress printing (stdout and stderr) goes to this module's debug log.
    """
    from deepspeed.checkpoint import ds_to_universal

    tag_dir, target = Path(tag_dir), Path(target)
    tmp = Path(tempfile.mkdtemp(dir=tag_dir, prefix=f".{UNIVERSAL}."))
    try:
        out = tmp / UNIVERSAL  # ds_to_universal also writes <parent>/latest_universal: inside tmp
        args = argparse.Namespace(
            input_folder=str(tag_dir),
            output_folder=str(out),
            num_extract_workers=1,
            num_merge_workers=1,
            keep_temp_folder=False,
            strict=True,
            inject_missing_state=True,  # DeepSpeed records universal info only for AutoTP/AutoEP models
        )
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed), plain_data_only():
            ds_to_universal.main(args)
        log.debug("ds_to_universal: %s", printed.getvalue())
        os.rename(out, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    fsync_dir(tag_dir)


def repair_zero3_universal_load(optimizer, weight_decay: list) -> None:
    """Undo two slips of DeepSpeed 0.19.8's ZeRO-3 universal load (harmless for ZeRO-1/2).

    It gives every parameter group group 0's hyperparameters: the weight decay of each group (none
    on biases and LayerNorm, :func:`~mlkd_scale.engine.schedule.build_optimizer`) is put back from
    ``weight_decay``, the values before the load. And it hands one and the same ``step`` tensor to
    every group's AdamW state, which torch increments in place once per group, so every group
    after the first would take a wrong bias correction: each group gets its own copy.
    """
    for group, value in zip(optimizer.param_groups, weight_decay, strict=True):
        group["weight_decay"] = value
    inner = getattr(optimizer, "optimizer", optimizer)
    for state in inner.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


@dataclass
class Resume:
    """Where a run continues from and how; made by :func:`prepare_resume` before the engine exists."""

    checkpoints: CheckpointManager
    seed: int
    num_shards: int | None  # stream shards of the run's data (fixed for the run); None: pretokenized
    tag_dir: Path | None = None  # None: a fresh start
    saved_world_size: int | None = None
    universal: bool = False  # reshaped through DeepSpeed's universal form (ZeRO 1-3)

    @property
    def reshaped(self) -> bool:
        """Resuming at another world size than the checkpoint's."""
        return self.tag_dir is not None and self.saved_world_size != self.checkpoints.world_size

    def engine_plan(self, plan: Plan) -> Plan:
        """``plan`` with DeepSpeed's ``checkpoint.load_universal`` set when resuming through the universal form."""
        if not self.universal:
            return plan
        config = dict(plan.deepspeed_config)
        config["checkpoint"] = {**config.get("checkpoint", {}), "load_universal": True}
        return dataclasses.replace(plan, deepspeed_config=config)

    def open_stream(self, data_spec, tokenizer) -> ShardedStream | PretokenizedStream:
        ckpt = self.checkpoints
        if data_spec.pretokenized_dir:
            return PretokenizedStream(data_spec, tokenizer, ckpt.rank, ckpt.world_size, self.seed)
        return ShardedStream(data_spec, tokenizer, ckpt.rank, ckpt.world_size, self.seed, self.num_shards)

    def load(self, engine) -> tuple[dict, dict]:
        """Restore ``engine`` and return ``(client_state, rank_state)`` for this rank. Collective."""
        ckpt = self.checkpoints
        if not self.reshaped:
            return ckpt.load(engine, self.tag_dir)
        weight_decay = [g.get("weight_decay") for g in engine.optimizer.param_groups]
        source = (self.tag_dir, UNIVERSAL) if self.universal else (self.tag_dir.parent, self.tag_dir.name)
        install_checkpoint_engine(engine)
        with plain_data_only():
            load_path, client = engine.load_checkpoint(
                str(source[0]), tag=source[1], load_optimizer_states=True, load_lr_scheduler_states=True
            )
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load the checkpoint {Path(*source)}")
        if self.universal:
            repair_zero3_universal_load(engine.optimizer, weight_decay)
        step = client["step"]
        if self.num_shards is None:  # pretokenized: one global position, the same in every rank file
            data = read_rank_state(self.tag_dir, 0)["data"]
            rng = read_rank_state(self.tag_dir, ckpt.rank)["rng"] if ckpt.rank < self.saved_world_size else None
            if rng is None:
                set_random_seed(derived_seed(self.seed, ckpt.rank, step))
                rng = capture_rng_state()
            return strip_deepspeed_keys(client), {"data": data, "rng": rng}
        # The old rank files holding this rank's shards, and its namesake's (for the RNG).
        old_ranks = {
            v % self.saved_world_size for v in owned_shards(ckpt.rank, ckpt.world_size, self.num_shards)
        }
        if ckpt.rank < self.saved_world_size:
            old_ranks.add(ckpt.rank)
        old = {r: read_rank_state(self.tag_dir, r) for r in sorted(old_ranks)}
        data = regroup({r: s["data"] for r, s in old.items()}, ckpt.rank, ckpt.world_size)
        if ckpt.rank in old:
            rng = old[ckpt.rank]["rng"]
        else:
            set_random_seed(derived_seed(self.seed, ckpt.rank, step))
            rng = capture_rng_state()
        return strip_deepspeed_keys(client), {"data": data, "rng": rng}


def prepare_resume(checkpoints: CheckpointManager, spec: RunSpec, zero_stage: int) -> Resume:
    """Find the checkpoint to resume (``checkpoint.resume``) and get it ready for this world size.

    Collective: at a new world size rank 0 converts a ZeRO-1/2/3 checkpoint to universal form (once)
    while the other ranks wait. Errors (CheckpointError / DataError) name the fix.
    """
    world_size = checkpoints.world_size
    tag_dir = checkpoints.resolve_resume(spec.checkpoint.resume)
    pretokenized = bool(spec.data.pretokenized_dir)
    wanted = spec.data.stream_shards
    if tag_dir is None:
        num_shards = None if pretokenized else wanted or world_size
        if num_shards is not None:
            check_world_size(world_size, num_shards)
        return Resume(checkpoints, spec.run.seed, num_shards)
    saved_world_size = read_complete(tag_dir)["world_size"]
    num_shards = None
    if not pretokenized:
        num_shards = shard_states(read_rank_state(tag_dir, 0)["data"])[0]
        if wanted is not None and wanted != num_shards:
            raise DataError(
                f"data.stream_shards is {wanted} but the run in {checkpoints.ckpt_dir} splits its data into "
                f"{num_shards} stream shards, fixed at its first launch; leave data.stream_shards unset or "
                f"set it to {num_shards}"
            )
        check_world_size(world_size, num_shards)
    resume = Resume(checkpoints, spec.run.seed, num_shards, tag_dir, saved_world_size)
    if resume.reshaped:
        saved_with_zero = has_zero_shards(tag_dir)
        if saved_with_zero != (zero_stage > 0):
            raise CheckpointError(
                f"checkpoint {tag_dir} was saved {'with ZeRO stage 1-3' if saved_with_zero else 'with ZeRO stage 0'} "
                f"by {saved_world_size} ranks; at a new world size ({world_size}) train.zero_stage must be "
                f"{'1, 2 or 3' if saved_with_zero else '0'} as well, or resume with {saved_world_size} ranks"
            )
        resume.universal = saved_with_zero
        if checkpoints.rank == 0:
            log.warning(
                "resuming %s (saved by %d ranks) on %d ranks%s",
                tag_dir,
                saved_world_size,
                world_size,
                " through a universal checkpoint" if resume.universal else "",
            )
        if resume.universal:
            ensure_universal(tag_dir, checkpoints.rank)
    return resume
