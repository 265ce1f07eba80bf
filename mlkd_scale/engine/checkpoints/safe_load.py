"""Reading checkpoint files without running code from them, and writing DeepSpeed's shards durably.

What is trusted and what is not:

* **Not trusted: every file under a checkpoint directory.** A ``.pt`` file is a pickle, and a
  pickle can name any Python callable to run on load (``os.system`` in an object's
  ``__reduce__``). So every ``.pt`` file of a checkpoint — our rank state, DeepSpeed's model and
  optimizer shards, the universal checkpoint's per-parameter files — is read with
  ``torch.load(weights_only=True)``: tensors, containers and plain values only, plus exactly the
  four DeepSpeed classes its shards hold (:data:`DEEPSPEED_TYPES`: two loss-scaler records, the
  ZeRO stage enum and a fragment address; plain data classes without custom unpickling). A file
  that names anything else is refused with one :class:`CheckpointError` naming the file and the
  global it asked for; a truncated or damaged file gets one too. Nothing is executed.
* JSON files (``COMPLETE``, ``best.json``, ``hf_meta/config.json``) are data by construction;
  they are parsed and checked, never evaluated. The tokenizer in ``hf_meta`` is read by
  transformers' tokenizer classes (JSON and text files; no remote code).
* **Trusted: the run spec and the code.** The spec names the teacher, the data and the
  DeepSpeed config; the teacher is loaded with transformers' ``from_pretrained`` (safetensors
  preferred; ``trust_remote_code`` is never set).

DeepSpeed reads its shards through the engine's *checkpoint engine* (``engine.checkpoint_engine``);
:func:`install_checkpoint_engine` replaces it with :class:`SafeCheckpointEngine`, which loads as
above and fsyncs every shard it writes (DeepSpeed's own never does, so after a host crash a
``COMPLETE`` marker could vouch for shards that never reached the disk). Some DeepSpeed code reads
files with ``torch.load(weights_only=False)`` directly (``zero_to_fp32``, ``ds_to_universal``, the
universal load): :func:`plain_data_only` makes every ``torch.load`` inside it a weights-only load.
"""

from __future__ import annotations

import contextlib
import functools
import os
import pickle
import re
import zlib
from pathlib import Path
from typing import Any

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

from mlkd_scale.errors import CheckpointError

_CHUNK = 1 << 22


@functools.cache
def deepspeed_types() -> tuple[type, ...]:
    """The DeepSpeed classes its ZeRO optimizer shards pickle (DeepSpeed 0.19.8), all plain records."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return (LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address)


def load_plain(path: str | os.PathLike, *, mmap: bool = False, map_location: Any = "cpu") -> Any:
    """``torch.load`` of ``path`` that runs no code; every failure is one CheckpointError naming the file."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(list(deepspeed_types())):
            return _TORCH_LOAD(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        wanted = re.search(r"GLOBAL (\S+)", str(error))
        what = f"the Python object {wanted.group(1)}" if wanted else "something that is not plain data"
        raise CheckpointError(
            f"{path} asks to build {what} when loaded, which a checkpoint of this program never holds; "
            "refusing to load it (it may have been replaced or tampered with). Resume from another "
            "checkpoint, or delete this one"
        ) from None
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; the checkpoint is damaged") from None
    except (OSError, EOFError, RuntimeError, ValueError, KeyError, IndexError) as error:
        raise CheckpointError(
            f"{path} cannot be read ({type(error).__name__}: {_first_line(error)}); the file is truncated "
            "or damaged. Resume from another checkpoint, or delete this one"
        ) from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else "no detail"


_TORCH_LOAD = torch.load


@contextlib.contextmanager
def plain_data_only():
    """Every ``torch.load`` inside runs as :func:`load_plain` does (for DeepSpeed's direct loads)."""

    def weights_only_load(f, map_location=None, *args, weights_only=None, mmap=None, **kwargs):
        if not isinstance(f, (str, os.PathLike)):
            with torch.serialization.safe_globals(list(deepspeed_types())):
                return _TORCH_LOAD(f, map_location=map_location, weights_only=True, mmap=mmap, **kwargs)
        return load_plain(f, mmap=bool(mmap), map_location=map_location)

    torch.load = weights_only_load
    try:
        yield
    finally:
        torch.load = _TORCH_LOAD


def fsync_file(path: str | os.PathLike) -> None:
    """Flush ``path``'s data to the disk (a file another process or library wrote)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_checksum(path: str | os.PathLike) -> int:
    """CRC-32 of the file's bytes (zlib; several GB/s: fast enough to check every file of a checkpoint)."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


class SafeCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's synchronous torch checkpoint engine, loading with :func:`load_plain` and fsyncing
    every file it saves; it remembers what it wrote since the last :meth:`take_written`."""

    def __init__(self, config_params=None):
        super().__init__(config_params)
        self.name = "SafeCheckpointEngine"
        self._written: list[str] = []

    def save(self, state_dict, path: str):
        super().save(state_dict, path)
        fsync_file(path)
        self._written.append(str(path))

    def load(self, path: str, map_location=None):
        return load_plain(path, map_location=map_location)

    def take_written(self) -> list[str]:
        """The paths saved since the last call (this rank's shards of the checkpoint being written)."""
        written, self._written = self._written, []
        return written


def install_checkpoint_engine(engine) -> None:
    """Make ``engine`` (a DeepSpeed engine) save and load its checkpoints through :class:`SafeCheckpointEngine`."""
    current = getattr(engine, "checkpoint_engine", None)
    if isinstance(current, SafeCheckpointEngine):
        return
    if current is not None and current.is_decoupled():
        raise CheckpointError(
            "checkpoints need DeepSpeed's synchronous checkpoint engine; "
            "remove the asynchronous/decoupled checkpoint section from the DeepSpeed config"
        )
    engine.checkpoint_engine = SafeCheckpointEngine(getattr(engine, "_config", None))
