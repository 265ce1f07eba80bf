"""One rank's shard of the teacher cache on disk: raw arrays written in place, committed, read memory-mapped.

Layout of a shard directory (``<cache dir>/rank00000/``)::

    meta.json       {"key", "rows", "fields": {name: {"shape": [...], "dtype": "float16"}}}; written
                    (atomically) before any row, so a resumed build knows what its files hold
    <field>.bin     ``rows × prod(shape)`` values of ``dtype``, C order, native byte order,
                    preallocated to their full size; bfloat16 is stored as its 16 bits (numpy has no
                    bfloat16) and viewed back by torch
    progress.json   {"key", "rows"}: rows [0, rows) are on disk; written (atomically) only after
                    every data file was fsynced, so it never claims a row the disk may not hold
    COMPLETE        the key; written (atomically) last, once every row is fsynced

Trust: a shard is read only when COMPLETE holds the expected key, meta.json describes exactly the
fields the caller expects and every file has its exact size (:func:`open_shard`). A shard without
COMPLETE is debris of a killed build: :class:`ShardWriter` continues it after the last committed
row when its meta.json matches, and starts it afresh otherwise; rows after the last commit are
always recomputed. Nothing read here can run code: JSON, and raw numbers through ``numpy.memmap``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mlkd_scale.engine.checkpoints.files import atomic_write_text

META = "meta.json"
PROGRESS = "progress.json"
COMPLETE = "COMPLETE"

#: storage dtype name -> (numpy dtype on disk, torch dtype it is viewed as)
STORAGE = {
    "float32": (np.float32, torch.float32),
    "float16": (np.float16, torch.float16),
    "bfloat16": (np.int16, torch.bfloat16),
}


@dataclass(frozen=True)
class FieldSpec:
    """One cached tensor per sample: its shape without the batch dimension and its storage dtype."""

    shape: tuple[int, ...]
    dtype: str  # a key of STORAGE

    @property
    def row_bytes(self) -> int:
        return math.prod(self.shape) * np.dtype(STORAGE[self.dtype][0]).itemsize

    def as_json(self) -> dict:
        return {"shape": list(self.shape), "dtype": self.dtype}


def shard_dir(cache_dir: Path, rank: int) -> Path:
    return Path(cache_dir) / f"rank{rank:05d}"


def _meta(key: str, rows: int, fields: dict[str, FieldSpec]) -> dict:
    return {"key": key, "rows": rows, "fields": {name: spec.as_json() for name, spec in sorted(fields.items())}}


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _files_sized(directory: Path, rows: int, fields: dict[str, FieldSpec]) -> bool:
    for name, spec in fields.items():
        path = directory / f"{name}.bin"
        if not path.is_file() or path.stat().st_size != rows * spec.row_bytes:
            return False
    return True


def is_complete(directory: Path, key: str, rows: int, fields: dict[str, FieldSpec]) -> bool:
    """True when the shard is finished for ``key`` and its files are exactly what ``fields`` says."""
    try:
        marker = (directory / COMPLETE).read_text().strip()
    except OSError:
        return False
    return marker == key and _read_json(directory / META) == _meta(key, rows, fields) and _files_sized(
        directory, rows, fields
    )


def open_shard(directory: Path, key: str, rows: int, fields: dict[str, FieldSpec]) -> dict[str, np.ndarray] | None:
    """The shard's arrays ``[rows, *shape]``, memory-mapped read-only; None unless it is complete for ``key``."""
    if not is_complete(directory, key, rows, fields):
        return None
    arrays = {}
    for name, spec in fields.items():
        np_dtype = STORAGE[spec.dtype][0]
        if rows == 0:  # an empty file cannot be mapped
            arrays[name] = np.empty((0, *spec.shape), np_dtype)
        else:
            path = directory / f"{name}.bin"
            arrays[name] = np.memmap(path, dtype=np_dtype, mode="r", shape=(rows, *spec.shape))
    return arrays


def to_storage(tensor: torch.Tensor, dtype: str) -> np.ndarray:
    """``tensor`` [B, ...] as the numpy array written to disk in ``dtype``.

    Casting to a 16-bit dtype saturates at its largest finite value, so the taps' marker of masked
    attention entries (the source dtype's minimum) stays a very negative number that every loss
    treats as masked. Any other value beyond the range is an error naming the fix (no silent inf).
    """
    target = STORAGE[dtype][1]
    tensor = tensor.detach()
    if torch.finfo(target).max < torch.finfo(tensor.dtype).max:
        limit = torch.finfo(target).max
        marker = torch.finfo(tensor.dtype).min
        beyond = (tensor.abs() > limit) & (tensor != marker)
        if bool(beyond.any()):
            worst = float(tensor[beyond].abs().max())
            raise OverflowError(
                f"teacher.cache_dtype: a teacher feature reaches |x| = {worst:.3g}, beyond {dtype}'s range "
                f"({limit:.3g}); set teacher.cache_dtype to bf16 or fp32"
            )
        tensor = tensor.clamp(-limit, limit)
    stored = tensor.to(target).cpu().contiguous()
    if dtype == "bfloat16":
        stored = stored.view(torch.int16)
    return stored.numpy()


def from_storage(array: np.ndarray, dtype: str) -> torch.Tensor:
    """The inverse of :func:`to_storage` (the cast back to the teacher's dtype is the caller's)."""
    tensor = torch.from_numpy(array)
    return tensor.view(torch.bfloat16) if dtype == "bfloat16" else tensor


class ShardWriter:
    """Writes one rank's shard of ``rows`` samples, resumably (see the module docstring).

    ``rows_done`` is where writing must continue: 0 for a new shard, the committed rows of a killed
    build of the same key and fields, ``rows`` for a complete shard (``finished``).
    """

    def __init__(self, directory: Path, key: str, rows: int, fields: dict[str, FieldSpec]):
        self.directory, self.key, self.rows, self.fields = Path(directory), key, rows, fields
        self.finished = is_complete(self.directory, key, rows, fields)
        self.rows_done = rows if self.finished else self._resume_point()
        self._fds: dict[str, int] = {}
        if not self.finished:
            self._open_files()

    def _resume_point(self) -> int:
        d = self.directory
        progress = _read_json(d / PROGRESS) or {}
        same = _read_json(d / META) == _meta(self.key, self.rows, self.fields) and progress.get("key") == self.key
        done = progress.get("rows")
        if same and isinstance(done, int) and 0 <= done <= self.rows and _files_sized(d, self.rows, self.fields):
            return done
        shutil.rmtree(d, ignore_errors=True)  # debris of another key, or a shard we cannot vouch for
        return 0

    def _open_files(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / COMPLETE).unlink(missing_ok=True)
        if self.rows_done == 0:
            atomic_write_text(self.directory / META, json.dumps(_meta(self.key, self.rows, self.fields), indent=1))
        for name, spec in self.fields.items():
            fd = os.open(self.directory / f"{name}.bin", os.O_RDWR | os.O_CREAT, 0o644)
            os.ftruncate(fd, self.rows * spec.row_bytes)
            self._fds[name] = fd

    def write(self, start: int, arrays: dict[str, np.ndarray]) -> None:
        """Rows ``start .. start + len`` of every field (not yet durable: :meth:`commit` makes them so)."""
        for name, array in arrays.items():
            spec = self.fields[name]
            if tuple(array.shape[1:]) != spec.shape or start + len(array) > self.rows:
                raise ValueError(f"teacher cache field {name}: rows {start}+{len(array)} of shape "
                                 f"{tuple(array.shape[1:])} do not fit {self.rows} rows of {spec.shape}")
            os.pwrite(self._fds[name], np.ascontiguousarray(array).tobytes(), start * spec.row_bytes)

    def commit(self, rows: int) -> None:
        """Make rows [0, rows) durable, then record that they are."""
        for fd in self._fds.values():
            os.fsync(fd)
        atomic_write_text(self.directory / PROGRESS, json.dumps({"key": self.key, "rows": rows}))
        self.rows_done = rows

    def complete(self) -> None:
        """Commit every row and write COMPLETE (the last file); closes the files."""
        if not self.finished:
            self.commit(self.rows)
            atomic_write_text(self.directory / COMPLETE, self.key)
            (self.directory / PROGRESS).unlink(missing_ok=True)
            self.finished = True
        self.close()

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
