"""Crash-safe DeepSpeed checkpoints: save, auto-resume, keep-last-N.

Layout under ``ckpt_dir`` (one directory per run)::

    latest                      text: the tag of the newest *complete* checkpoint (written by us)
    best.json                   task runs: the checkpoint best on dev, pinned against pruning
    hf_meta/                    the student's HF config + tokenizer, written once (export needs it)
    step00001000/               one tag per saved optimizer step
        mp_rank_00_model_states.pt, *_optim_states.pt   DeepSpeed's own shards (+ client_state)
        rank_state/rank00000.pt one file per rank: data position, RNG (they differ per rank)
        COMPLETE                JSON {step, world_size, time, tag, files}: the commit marker and
                                the manifest (every file's size and CRC-32, checkpoint_files.py)
    mlkd_run.json               the run this folder belongs to (another run refuses to write here)

Why not DeepSpeed's ``latest``: rank 0 writes it as soon as *its own* shards are on disk, before
the other ranks are done, so a crash can leave ``latest`` naming a half-written checkpoint. Here a
checkpoint counts only once ``COMPLETE`` exists, and rank 0 writes ``COMPLETE`` (then ``latest``)
only after a barrier that every rank reaches after writing all its files. A tag directory without
``COMPLETE`` is debris of a crash: resume ignores it and the next save removes it.

Every shard is fsynced by the rank that wrote it (:mod:`~mlkd_scale.engine.checkpoints.safe_load`'s checkpoint
engine) before ``COMPLETE`` is written, and rank 0 verifies the new checkpoint against its
manifest before ``latest`` moves to it and older ones are pruned, so ``keep_last`` never deletes
the last verified checkpoint first. Resume verifies before loading: a checkpoint that fails is
reported (file and fault), set aside as ``<tag>.damaged`` and the previous verified one is used,
``latest`` moved back to it. Every ``.pt`` file is loaded without running code
(:func:`~mlkd_scale.engine.checkpoints.safe_load.load_plain`).

All ranks must see the same file system (a shared one on multi-node clusters).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import PreTrainedModel

from mlkd_scale.engine.checkpoints import files as checkpoint_files
from mlkd_scale.engine.checkpoints.files import (
    COMPLETE,
    DEEPSPEED_KEYS,
    TAG_RE,
    atomic_write,
    atomic_write_text,
    claim_folder,
    fsync_dir,
    is_complete,
    list_tags,
    rank_state_name,
    read_complete,
    strip_deepspeed_keys,
    tag_for,
)
from mlkd_scale.engine.checkpoints.safe_load import install_checkpoint_engine, load_plain, plain_data_only
from mlkd_scale.engine.distributed import barrier, from_rank0, gather_to_all
from mlkd_scale.errors import CheckpointError

log = logging.getLogger(__name__)

LATEST = "latest"
BEST = "best.json"  # {"tag", "step", ...}: the checkpoint pinned against keep_last pruning (task runs)
HF_META = "hf_meta"
# ----------------------------------------------------------------------------- the manager


class CheckpointManager:
    """Saves, finds, verifies and loads the run's checkpoints; every rank builds one and calls every
    method (except :meth:`save_hf_meta`, which is rank 0's job but harmless elsewhere).

    ``owner`` names the run (and stage) the folder belongs to; a folder recorded for another owner
    is refused (:func:`~mlkd_scale.engine.checkpoints.files.claim_folder`).
    """

    def __init__(
        self, ckpt_dir: str | Path, keep_last: int, rank: int, world_size: int, owner: str | None = None,
        every_n_steps: int | None = None,
    ):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.ckpt_dir = Path(ckpt_dir)
        self.keep_last = keep_last
        self.rank = rank
        self.world_size = world_size
        self.every_n_steps = every_n_steps  # periodic checkpoints (checkpoint.every_n_steps); None: none
        self._periodic_pending = False  # a periodic checkpoint fell on a step that could not be saved
        self.commit_hooks: list[Callable[[int], None]] = []  # called with the step once `latest` names it
        if owner is not None:
            claim_folder(self.ckpt_dir, owner, "the checkpoint folder", allow_foreign=True)

    # -- save

    def save_due(self, step: int, forced: bool = False, wanted: bool = False, healthy: bool = True) -> bool:
        """Whether to checkpoint after ``step``; the one place that decides it.

        ``forced``: a stop, the end of a stage or an evaluation that is always checkpointed.
        ``wanted``: a reason of the caller's (a new best). Periodic checkpoints (every
        ``every_n_steps``) and wanted ones need a ``healthy`` step (not one of a streak of skipped,
        non-finite steps); a periodic one that fell on an unhealthy step is taken at the next
        healthy one.
        """
        if self.every_n_steps and step % self.every_n_steps == 0:
            self._periodic_pending = True
        due = forced or ((self._periodic_pending or wanted) and healthy)
        if due:
            self._periodic_pending = False
        return due

    def save(self, engine, step: int, client_state: dict, rank_state: dict) -> Path:
        """Write checkpoint ``step`` on every rank, then commit it (COMPLETE with the manifest, a
        verification, ``latest``, pruning).

        Collective: every rank must call it with the same ``step``. Returns the tag directory.
        """
        install_checkpoint_engine(engine)  # refuses an asynchronous engine: its COMPLETE would prove nothing
        clashes = sorted(DEEPSPEED_KEYS.intersection(client_state))
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
        barrier()

        engine.checkpoint_engine.take_written()  # forget anything saved outside a checkpoint
        engine.save_checkpoint(str(self.ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
        rank_file = tag_dir / rank_state_name(self.rank)
        atomic_write(rank_file, lambda f: torch.save(rank_state, f))
        written = engine.checkpoint_engine.take_written() + [str(rank_file)]
        for folder in {Path(p).parent for p in written}:
            fsync_dir(folder)
        # every rank's shards and rank_state are on disk (fsynced) past this gather
        manifest = {}
        for files in gather_to_all(checkpoint_files.describe(written, tag_dir)):
            manifest.update(files)

        error = None
        if self.rank == 0:
            marker = {"step": step, "world_size": self.world_size, "time": time.time(), "tag": tag,
                      "files": dict(sorted(manifest.items()))}
            atomic_write_text(tag_dir / COMPLETE, json.dumps(marker, indent=1) + "\n")
            found = checkpoint_files.problems(tag_dir)
            if found:
                error = (f"checkpoint {tag_dir} did not verify right after it was written ({'; '.join(found)}); "
                         f"{self.ckpt_dir / LATEST} still names {self.latest_name()} and nothing was pruned. "
                         "Check the file system (space, quota, errors) and relaunch")
            else:
                atomic_write_text(self.ckpt_dir / LATEST, tag)
                self._prune(keep=tag_dir)
        error = from_rank0(error)  # nobody races ahead (and e.g. exits) while rank 0 is still committing
        if error is not None:
            raise CheckpointError(error)
        for hook in self.commit_hooks:  # e.g. trackers that log a step only once a checkpoint covers it
            hook(step)
        return tag_dir

    def _prune(self, keep: Path) -> None:
        """Delete complete checkpoints beyond ``keep_last`` (oldest step first, never ``keep``) and
        incomplete directories older than ``keep`` (a crash left them; nothing can resume them)."""
        keep_step = int(TAG_RE.match(keep.name).group(1))
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
        for name in (LATEST, BEST):  # temp files of a commit a crash cut short (only rank 0 writes them)
            for debris in self.ckpt_dir.glob(f".{name}.*.tmp"):
                debris.unlink(missing_ok=True)

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
        barrier()

    def read_best(self) -> dict | None:
        """The pinned best checkpoint's record (``tag``, ``step``, what mark_best was given), or None
        (also when ``best.json`` is damaged or names no tag of this folder: then a warning)."""
        path = self.ckpt_dir / BEST
        try:
            best = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            log.warning("%s is damaged (%s); no checkpoint is pinned as the best", path, error)
            return None
        if not isinstance(best, dict) or not TAG_RE.match(str(best.get("tag"))) or not isinstance(best.get("step"), int):
            log.warning("%s does not name a checkpoint tag of %s; no checkpoint is pinned", path, self.ckpt_dir)
            return None
        return best

    # -- resume

    def _read_latest(self) -> str | None:
        """The tag ``latest`` names: a ``stepNNNNNNNN`` name inside this folder, nothing else."""
        path = self.ckpt_dir / LATEST
        try:
            latest = path.read_text().strip()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as error:
            log.warning("%s cannot be read (%s); ignoring it", path, error)
            return None
        if latest and not TAG_RE.match(latest):
            log.warning("%s holds %r, which is not a checkpoint tag of this folder; ignoring it", path, latest[:80])
            return None
        return latest or None

    def latest_name(self) -> str:
        """The tag ``latest`` names, for messages (``"none"`` before the first checkpoint)."""
        return self._read_latest() or "none"

    def newest_complete(self) -> Path | None:
        complete = [p for _, p in list_tags(self.ckpt_dir) if is_complete(p)]
        return complete[-1] if complete else None

    def resolve_resume(self, resume: str) -> Path | None:
        """Which verified tag directory to load for ``checkpoint.resume`` ('auto' | 'never' | path).

        Returns None for a fresh start. Collective when a process group exists: rank 0 verifies
        and decides, every rank gets its answer (or its error).
        """
        answer = None
        if self.rank == 0:
            try:
                answer = ("ok", self._choose(resume))
            except CheckpointError as error:
                answer = ("error", str(error))
        kind, value = from_rank0(answer)
        if kind == "error":
            raise CheckpointError(value)
        return None if value is None else Path(value)

    def _choose(self, resume: str) -> Path | None:
        if resume == "never":
            existing = self.newest_complete()
            if existing is not None:
                raise CheckpointError(
                    f"checkpoint.resume is 'never' but {self.ckpt_dir} already holds checkpoint {existing.name}; "
                    "set checkpoint.resume to 'auto' to continue it, or choose a new output directory"
                )
            return None
        if resume != "auto":
            return self._explicit(Path(resume))
        tag_dir, failed = self.newest_verified()
        if tag_dir is not None:
            self._fall_back(tag_dir, failed)
        return tag_dir

    def newest_verified(self) -> tuple[Path | None, list[tuple[Path, list[str]]]]:
        """The checkpoint to continue from: the one ``latest`` names, else (or when it does not
        verify) the newest complete one that verifies; and those that failed, with their problems.

        Changes nothing. ``(None, [])`` when the folder holds no complete checkpoint; one
        CheckpointError listing every problem when none of them verifies.
        """
        latest = self._read_latest()
        candidates = [p for _, p in reversed(list_tags(self.ckpt_dir)) if is_complete(p)]
        if latest is not None and is_complete(self.ckpt_dir / latest):
            candidates.remove(self.ckpt_dir / latest)
            candidates.insert(0, self.ckpt_dir / latest)
        elif candidates:
            why = "is missing" if latest is None else f"names {latest!r}, which is not a complete checkpoint"
            log.warning("%s %s; trying the newest complete checkpoint %s", self.ckpt_dir / LATEST, why, candidates[0].name)
        failed = []
        for tag_dir in candidates:
            found = checkpoint_files.problems(tag_dir)
            if not found:
                return tag_dir, failed
            log.error("checkpoint %s does not verify: %s", tag_dir, "; ".join(found))
            failed.append((tag_dir, found))
        if failed:
            raise CheckpointError(
                f"no checkpoint in {self.ckpt_dir} verifies: "
                + " | ".join(f"{p.name}: {'; '.join(f)}" for p, f in failed)
                + ". Nothing was changed; to start over, give the run a new run.output_dir (or move this "
                "folder away)"
            )
        return None, []

    def _fall_back(self, tag_dir: Path, failed: list) -> None:
        """Resume from ``tag_dir`` after ``failed`` did not verify: set them aside, point ``latest`` back."""
        for path, _ in failed:
            aside = checkpoint_files.set_aside(path)
            log.warning("set the damaged checkpoint %s aside as %s (delete it when you have looked at it)", path, aside)
        if self._read_latest() != tag_dir.name:
            atomic_write_text(self.ckpt_dir / LATEST, tag_dir.name)
            log.warning("%s now names %s, the newest checkpoint that verifies", self.ckpt_dir / LATEST, tag_dir.name)

    @staticmethod
    def _explicit(path: Path) -> Path:
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
        checkpoint_files.verify(path)
        return path

    # -- load

    def load(self, engine, tag_dir: str | Path) -> tuple[dict, dict]:
        """Restore module, optimizer and lr scheduler into ``engine``; return (client_state, rank_state).

        Collective. ``tag_dir`` comes from :meth:`resolve_resume` (verified). Under ZeRO-3 the engine
        must be fresh (DeepSpeed cannot load into a module it has already partitioned and trained).
        """
        tag_dir = Path(tag_dir)
        saved_ws = read_complete(tag_dir)["world_size"]
        if saved_ws != self.world_size:
            raise CheckpointError(
                f"checkpoint {tag_dir} was saved by {saved_ws} ranks but this run has {self.world_size}; "
                "resuming at a new world size needs a universal checkpoint (mlkd_scale.engine.checkpoints.reshard, "
                f"which the general-distillation trainer uses), or run with {saved_ws} ranks"
            )
        install_checkpoint_engine(engine)
        with plain_data_only():
            load_path, client_state = engine.load_checkpoint(
                str(tag_dir.parent), tag=tag_dir.name, load_optimizer_states=True, load_lr_scheduler_states=True
            )
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load the checkpoint {tag_dir}")
        # DeepSpeed hands back its own leftovers too (ds_config, param_shapes, for ZeRO-0 even the
        # whole optimizer state): return exactly what the caller saved.
        client_state = strip_deepspeed_keys(client_state)
        return client_state, load_plain(tag_dir / rank_state_name(self.rank))

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
        fsync_dir(self.ckpt_dir)
        return target
