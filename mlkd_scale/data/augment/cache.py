"""Sharded, cached, resumable augmentation runs on disk.

Augmenting a GLUE training set with a BERT-base masked LM takes hours, so the work is split over
ranks (rank ``r`` takes the examples whose index ``i % world_size == r``) and every rank appends
to its own shard, committing its position after each chunk of examples. A killed run restarts
where it stopped: each shard is truncated back to its last committed byte (dropping a partial
trailing line and any example written after the last commit), and committed examples are skipped.
Because :class:`~mlkd_scale.data.augment.augmenter.Augmenter` seeds a local RNG per example, the final cache
is the same whether a run was interrupted or not, and whatever the world size.

Layout of ``out_dir``::

    settings.json                           p, k, n, seed, model, neighbours, world_size, input meta
    shard-00000-of-00002.jsonl              one JSON line per variant, in example order
    shard-00000-of-00002.progress.json      {"last_index", "examples", "variants", "bytes", "complete"}
    shard-00001-of-00002.jsonl / .progress.json
    DONE                                    written once every shard is complete

Lines hold ``example_index`` (position in the input), ``variant``, ``augmented``, ``text_a``
(``text_b``) and every other field of the input example (the label), copied.
"""

from __future__ import annotations

import heapq
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from mlkd_scale.errors import AugmentCacheError

SETTINGS = "settings.json"
DONE = "DONE"
_RESERVED = {"example_index", "variant", "augmented", "text_a", "text_b"}


def shard_path(out_dir: Path, rank: int, world_size: int, suffix: str = ".jsonl") -> Path:
    return Path(out_dir) / f"shard-{rank:05d}-of-{world_size:05d}{suffix}"


def _progress_path(out_dir: Path, rank: int, world_size: int) -> Path:
    return shard_path(out_dir, rank, world_size, ".progress.json")


def _write_json_atomic(path: Path, payload: dict) -> None:
    """Write to a private temporary file, fsync, then rename: readers see old or new, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w") as f:
        json.dump(payload, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _check_settings(out_dir: Path, settings: dict) -> None:
    path = out_dir / SETTINGS
    settings = json.loads(json.dumps(settings))  # normalise tuples etc. to what JSON gives back
    if not path.exists():
        _write_json_atomic(path, settings)  # every rank may do this; the content is identical
        return
    recorded = json.loads(path.read_text())
    if recorded != settings:
        keys = sorted(set(recorded) | set(settings))
        diffs = "; ".join(f"{key}: {recorded.get(key)!r} in the cache, {settings.get(key)!r} now"
                          for key in keys if recorded.get(key) != settings.get(key))
        raise AugmentCacheError(
            f"{path} was written with other settings ({diffs}); rerun with the recorded settings to "
            f"resume, or pass a new output directory")


def _load_progress(out_dir: Path, rank: int, world_size: int) -> dict:
    """This shard's committed position; truncates the shard back to it (the resume step)."""
    progress_file = _progress_path(out_dir, rank, world_size)
    shard = shard_path(out_dir, rank, world_size)
    state = {"last_index": -1, "examples": 0, "variants": 0, "bytes": 0, "complete": False}
    if progress_file.exists():
        state = json.loads(progress_file.read_text())
    size = shard.stat().st_size if shard.exists() else 0
    if size < state["bytes"]:
        raise AugmentCacheError(
            f"{shard} is shorter than its committed length in {progress_file}: the cache is damaged; "
            f"delete {out_dir} and run the augmentation again")
    if size > state["bytes"]:
        os.truncate(shard, state["bytes"])
    return state


def _commit(f, state: dict, progress_file: Path) -> None:
    f.flush()
    os.fsync(f.fileno())
    state["bytes"] = f.tell()
    _write_json_atomic(progress_file, state)


def _run_shard(examples: Iterable[Mapping], out_dir: Path, augmenter, rank: int, world_size: int,
               state: dict, commit_every: int, progress_bar) -> None:
    progress_file = _progress_path(out_dir, rank, world_size)
    with shard_path(out_dir, rank, world_size).open("ab") as f:
        pending = 0
        for index, example in enumerate(examples):
            if index % world_size != rank or index <= state["last_index"]:
                continue
            copied = {k: v for k, v in example.items() if k not in _RESERVED}
            for row in augmenter.augment(index, example["text_a"], example.get("text_b")):
                line = {"example_index": index, **row, **copied}
                f.write((json.dumps(line, ensure_ascii=False) + "\n").encode("utf-8"))
                state["variants"] += 1
            state["examples"] += 1
            state["last_index"] = index
            pending += 1
            if progress_bar is not None:
                progress_bar.update(1)
            if pending >= commit_every:
                _commit(f, state, progress_file)
                pending = 0
        state["complete"] = True
        _commit(f, state, progress_file)


def _summary(out_dir: Path, world_size: int) -> dict | None:
    """Totals over all shards, or None while any shard is incomplete."""
    totals = {"world_size": world_size, "examples": 0, "variants": 0}
    for rank in range(world_size):
        path = _progress_path(out_dir, rank, world_size)
        if not path.exists():
            return None
        state = json.loads(path.read_text())
        if not state["complete"]:
            return None
        totals["examples"] += state["examples"]
        totals["variants"] += state["variants"]
    return totals


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def augment_dataset(examples: Iterable[Mapping], out_dir: str | Path, augmenter, rank: int = 0,
                    world_size: int = 1, *, meta: dict | None = None, commit_every: int = 16,
                    show_progress: bool = False) -> dict | None:
    """Augment this rank's share of ``examples`` into ``out_dir``; resume if it was started before.

    ``examples`` yields dicts with ``text_a``, optional ``text_b``, and any other fields (copied).
    It must be the same sequence on every rank and on every resume (record its identity in
    ``meta``, e.g. a hash of the input file, so that ``settings.json`` catches a changed input).

    With torch.distributed initialised, all ranks meet at a barrier and rank 0 writes ``DONE``;
    without it (independent processes, e.g. a job array), whichever rank finds every shard complete
    writes it. Returns the totals written to ``DONE``, or None if other shards are still running.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_settings(out_dir, {**augmenter.settings(), "world_size": world_size, "meta": meta or {}})
    if not (out_dir / DONE).exists():
        state = _load_progress(out_dir, rank, world_size)
        if not state["complete"]:
            bar = None
            if show_progress:
                from tqdm.auto import tqdm

                total = len(range(rank, len(examples), world_size)) if hasattr(examples, "__len__") else None
                bar = tqdm(total=total, initial=state["examples"], desc="augment", unit="ex")
            _run_shard(examples, out_dir, augmenter, rank, world_size, state, max(1, commit_every), bar)
            if bar is not None:
                bar.close()
    dist = _dist()
    if dist is not None:
        dist.barrier()
    totals = _summary(out_dir, world_size)
    if totals is not None and (dist is None or rank == 0) and not (out_dir / DONE).exists():
        _write_json_atomic(out_dir / DONE, totals)
    if dist is not None:
        dist.barrier()  # no rank returns before DONE exists
    return totals


def iter_augmented(out_dir: str | Path) -> Iterator[dict]:
    """All variants of a finished cache, in example order (then variant order), streamed."""
    out_dir = Path(out_dir)
    if not (out_dir / DONE).exists():
        raise AugmentCacheError(
            f"{out_dir / DONE} is missing: the augmentation in {out_dir} has not finished; run "
            f"launchers/augment.py again with the same arguments to complete it")
    world_size = json.loads((out_dir / SETTINGS).read_text())["world_size"]
    shards = [_read_shard(shard_path(out_dir, r, world_size)) for r in range(world_size)]
    yield from heapq.merge(*shards, key=lambda row: (row["example_index"], row["variant"]))


def load_augmented(out_dir: str | Path) -> list[dict]:
    """:func:`iter_augmented` as a list."""
    return list(iter_augmented(out_dir))


def _read_shard(path: Path) -> Iterator[dict]:
    with path.open(encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)
