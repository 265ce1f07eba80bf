"""Crash-safe DeepSpeed checkpoints: save, auto-resume, keep-last-N.

Layout under ``ckpt_dir`` (one directory per run)::

    latest                      text: the tag of the newest *complete* checkpoint (written by us)
    best.json                   task runs: the checkpoint best on dev, pinned against pruning
    hf_meta/                    the student's HF config + tokenizer, written once (export needs it)
    step00001000/               one tag per saved optimizer step
        mp_rank_00_model_states.pt, *_optim_states.pt   DeepSpeed's own shards (+ client_state)
        rank_state/rank00000.pt one file per rank: data position, RNG (they differ per rank)
        COMPLETE                JSON {step, world_size, time, tag}: the commit marker

Why not DeepSpeed's ``latest``: rank 0 writes it as soon as *its own* shards are on disk, before
the other ranks are done, so a crash can leave ``latest`` naming a half-written checkpoint. Here a
checkpoint counts only once ``COMPLETE`` exists, and rank 0 writes ``COMPLETE`` (then ``latest``)
only after a barrier that every rank reaches after writing all its files. A tag directory without
``COMPLETE`` is debris of a crash: resume ignores it and the next save removes it.

All ranks must see the same file system (a shared one on multi-node clusters).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import random
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from transformers import PreTrainedModel

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
LATEST = "latest"
BEST = "best.json"  # {"tag", "step", ...}: the checkpoint pinned against keep_last pruning (task runs)
HF_META = "hf_meta"
RANK_STATE_DIR = "rank_state"
_TAG_RE = re.compile(r"^step(\d{8})$")
# DeepSpeed merges client_state into its own top-level dict, so these names would overwrite its
# entries (the weights, the optimizer, ...) without a word; on load they are filtered back out.
_DEEPSPEED_KEYS = frozenset(
    [
        "module",
        "buffer_names",
        "optimizer",
        "param_shapes",
        "frozen_param_shapes",
        "shared_params",
        "frozen_param_fragments",
        "lr_scheduler",
        "data_sampler",
        "random_ltd",
        "skipped_steps",
        "global_steps",
        "global_samples",
        "dp_world_size",
        "mp_world_size",
        "ds_config",
        "ds_version",
        "checkpoint_parallel_dimensions",
    ]
)


def strip_deepspeed_keys(client_state: dict) -> dict:
    """What the caller saved as client_state, without the entries DeepSpeed hands back with it."""
    return {k: v for k, v in client_state.items() if k not in _DEEPSPEED_KEYS}


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not fit this run; the message says what to do."""


# ----------------------------------------------------------------------------- small file helpers


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def is_complete(tag_dir: Path) -> bool:
    return (Path(tag_dir) / COMPLETE).is_file()


def read_complete(tag_dir: Path) -> dict:
    """The COMPLETE marker's JSON (step, world_size, time, tag)."""
    return json.loads((Path(tag_dir) / COMPLETE).read_text())


def list_tags(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """All ``stepNNNNNNNN`` directories (complete or not), oldest step first."""
    if not Path(ckpt_dir).is_dir():
        return []
    found = []
    for child in Path(ckpt_dir).iterdir():
        m = _TAG_RE.match(child.name)
        if m and child.is_dir():
            found.append((int(m.group(1)), child))
    return sorted(found)


def _fsync_dir(path: Path) -> None:
    """Make a rename durable: the directory entry itself must reach the disk."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some file systems do not allow opening directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write ``path`` so that a reader sees either the old file or the whole new one, never a part.

    The temp file lives in the same directory so ``os.replace`` is a rename on one file system.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), mode="w")


# ----------------------------------------------------------------------------- RNG


def capture_rng_state() -> dict:
    """Every RNG a training step may draw from (dropout, shuffling, augmentation), for rank_state.

    Only the current CUDA device is captured: each rank owns one device, and touching the others
    would create a CUDA context on every GPU from every rank.
    """
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch_cpu": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch_cpu"])
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["torch_cuda"])


# ----------------------------------------------------------------------------- the manager


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class CheckpointManager:
    """Saves, finds and loads the run's checkpoints; every rank builds one and calls every method
    (except :meth:`save_hf_meta`, which is rank 0's job but harmless elsewhere)."""

    def __init__(self, ckpt_dir: str | Path, keep_last: int, rank: int, world_size: int):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.ckpt_dir = Path(ckpt_dir)
        self.keep_last = keep_last
        self.rank = rank
        self.world_size = world_size

    # -- save

    def save(self, engine, step: int, client_state: dict, rank_state: dict) -> Path:
        """Write checkpoint ``step`` on every rank, then commit it (COMPLETE, ``latest``, pruning).

        Collective: every rank must call it with the same ``step``. Returns the tag directory.
        """
        is_decoupled = getattr(engine.checkpoint_engine, "is_decoupled", lambda: False)
        if is_decoupled():
            # An asynchronous checkpoint engine returns before the shards are on disk, so a
            # COMPLETE written after the barrier would not prove anything.
            raise CheckpointError(
                "checkpoints need DeepSpeed's synchronous checkpoint engine; "
                "remove the asynchronous/decoupled checkpoint section from the DeepSpeed config"
            )
        clashes = sorted(_DEEPSPEED_KEYS.intersection(client_state))
        if clashes:
            raise ValueError(
                f"client_state keys {clashes} are DeepSpeed's own checkpoint entries; rename them"
            )
        tag = tag_for(step)
        tag_dir = self.ckpt_dir / tag
        if is_complete(tag_dir) and self._read_latest() == tag:
            # Resumed from this very checkpoint and took no step since: nothing new to save.
            log.info("checkpoint %s is already complete and current; not writing it again", tag_dir)
            return tag_dir
        # An existing directory of this tag is debris of a crash or of an abandoned history (the
        # run resumed from an older checkpoint): never mix its files with the new ones. The
        # barrier is unconditional so that ranks cannot disagree on whether to wait.
        if self.rank == 0 and tag_dir.exists():
            shutil.rmtree(tag_dir)
        _barrier()

        engine.save_checkpoint(str(self.ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
        rank_file = tag_dir / RANK_STATE_DIR / f"rank{self.rank:05d}.pt"
        atomic_write(rank_file, lambda f: torch.save(rank_state, f))
        _barrier()  # every rank's shards and rank_state are on disk past this line

        if self.rank == 0:
            marker = {"step": step, "world_size": self.world_size, "time": time.time(), "tag": tag}
            atomic_write_text(tag_dir / COMPLETE, json.dumps(marker, indent=1) + "\n")
            atomic_write_text(self.ckpt_dir / LATEST, tag)
            self._prune(keep=tag_dir)
        _barrier()  # nobody races ahead (and e.g. exits) while rank 0 is still committing
        return tag_dir

    def _prune(self, keep: Path) -> None:
        """Delete complete checkpoints beyond ``keep_last`` (oldest step first, never ``keep``) and
        incomplete directories older than ``keep`` (a crash left them; nothing can resume them)."""
        keep_step = int(_TAG_RE.match(keep.name).group(1))
        tags = list_tags(self.ckpt_dir)
        pinned = self.read_best() or {}
        complete = [p for _, p in tags if p != keep and is_complete(p) and p.name != pinned.get("tag")]
        for path in complete[: max(0, len(complete) - (self.keep_last - 1))]:
            log.info("removing old checkpoint %s (keep_last=%d)", path, self.keep_last)
            shutil.rmtree(path, ignore_errors=True)
        for s, path in tags:
            if s < keep_step and not is_complete(path):
                log.info("removing incomplete checkpoint %s (left by a crash)", path)
                shutil.rmtree(path, ignore_errors=True)

    # -- the pinned best checkpoint

    def mark_best(self, step: int, info: dict | None = None) -> None:
        """Pin checkpoint ``step`` (already saved and complete) as the best: pruning never deletes it.

        Rank 0 writes ``best.json`` atomically; the previously pinned checkpoint becomes an ordinary
        one again (pruned by the next save if it is beyond ``keep_last``). Call on every rank.
        """
        if self.rank == 0:
            tag = tag_for(step)
            if not is_complete(self.ckpt_dir / tag):
                raise CheckpointError(f"cannot pin {self.ckpt_dir / tag} as the best: it is not a complete checkpoint")
            atomic_write_text(self.ckpt_dir / BEST, json.dumps({"tag": tag, "step": step, **(info or {})}) + "\n")
        _barrier()

    def read_best(self) -> dict | None:
        """The pinned best checkpoint's record (``tag``, ``step``, what mark_best was given), or None."""
        try:
            return json.loads((self.ckpt_dir / BEST).read_text())
        except FileNotFoundError:
            return None

    # -- resume

    def _read_latest(self) -> str | None:
        try:
            return (self.ckpt_dir / LATEST).read_text().strip() or None
        except FileNotFoundError:
            return None

    def latest_name(self) -> str:
        """The tag ``latest`` names, for messages (``"none"`` before the first checkpoint)."""
        return self._read_latest() or "none"

    def newest_complete(self) -> Path | None:
        complete = [p for _, p in list_tags(self.ckpt_dir) if is_complete(p)]
        return complete[-1] if complete else None

    def resolve_resume(self, resume: str) -> Path | None:
        """Which tag directory to load for the spec's ``checkpoint.resume`` ('auto' | 'never' | path).

        Returns None for a fresh start.
        """
        if resume == "never":
            existing = self.newest_complete()
            if existing is not None:
                raise CheckpointError(
                    f"checkpoint.resume is 'never' but {self.ckpt_dir} already holds checkpoint {existing.name}; "
                    "set checkpoint.resume to 'auto' to continue it, or choose a new output directory"
                )
            return None
        if resume == "auto":
            latest = self._read_latest()
            if latest is not None and is_complete(self.ckpt_dir / latest):
                return self.ckpt_dir / latest
            newest = self.newest_complete()
            if newest is not None and self.rank == 0:
                why = (
                    "is missing"
                    if latest is None
                    else f"names {latest!r}, which is not a complete checkpoint"
                )
                log.warning(
                    "%s %s; resuming from the newest complete checkpoint %s",
                    self.ckpt_dir / LATEST,
                    why,
                    newest.name,
                )
            return newest
        path = Path(resume)
        if not path.is_dir():
            raise CheckpointError(
                f"checkpoint.resume: {path} is not a directory; give a checkpoint tag directory "
                "(e.g. <checkpoints>/step00001000), 'auto' or 'never'"
            )
        if not is_complete(path):
            raise CheckpointError(
                f"checkpoint.resume: {path} is not a complete checkpoint (no {COMPLETE} file); "
                "give a tag directory that holds one, or 'auto'"
            )
        return path

    # -- load

    def load(self, engine, tag_dir: str | Path) -> tuple[dict, dict]:
        """Restore module, optimizer and lr scheduler into ``engine``; return (client_state, rank_state).

        Collective. Under ZeRO-3 the engine must be fresh (DeepSpeed cannot load into a module it
        has already partitioned and trained).
        """
        tag_dir = Path(tag_dir)
        if not is_complete(tag_dir):
            raise CheckpointError(f"{tag_dir} is not a complete checkpoint (no {COMPLETE} file)")
        saved_ws = read_complete(tag_dir)["world_size"]
        if saved_ws != self.world_size:
            raise CheckpointError(
                f"checkpoint {tag_dir} was saved by {saved_ws} ranks but this run has {self.world_size}; "
                "resuming at a new world size needs a universal checkpoint (mlkd_scale.engine.reshard, "
                f"which the general-distillation trainer uses), or run with {saved_ws} ranks"
            )
        rank_file = tag_dir / RANK_STATE_DIR / f"rank{self.rank:05d}.pt"
        if not rank_file.is_file():
            raise CheckpointError(f"{rank_file} is missing; the checkpoint {tag_dir} is damaged")

        load_path, client_state = engine.load_checkpoint(
            str(tag_dir.parent), tag=tag_dir.name, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load the checkpoint {tag_dir}")
        # DeepSpeed hands back its own leftovers too (ds_config, param_shapes, for ZeRO-0 even the
        # whole optimizer state): return exactly what the caller saved.
        client_state = strip_deepspeed_keys(client_state)
        # Our own file; it holds numpy RNG state and data-loader state, hence weights_only=False.
        rank_state = torch.load(rank_file, map_location="cpu", weights_only=False)
        return client_state, rank_state

    # -- export metadata

    def save_hf_meta(self, config, tokenizer=None) -> Path:
        """Write the student's HF config (and tokenizer) to ``<ckpt_dir>/hf_meta`` once.

        Export rebuilds the model from it without the run spec. ``config`` may also be the student
        model itself: then ``architectures`` is recorded from its class, which export needs to build
        the right head (a bare config made by hand has no ``architectures``).
        """
        target = self.ckpt_dir / HF_META
        if self.rank != 0 or target.is_dir():
            return target
        if isinstance(config, PreTrainedModel):
            model, config = config, copy.deepcopy(config.config)
            config.architectures = [type(model).__name__]
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.ckpt_dir, prefix=f".{HF_META}."))
        try:
            config.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _fsync_dir(self.ckpt_dir)
        return target
