"""The files of a checkpoint: their names, the manifest and the check against it, who owns a folder.

**The manifest.** ``COMPLETE`` (the commit marker, JSON) lists every file the ranks wrote for the
checkpoint — DeepSpeed's shards and each rank's rank_state file — with its size in bytes and its
CRC-32 (:func:`~mlkd_scale.engine.checkpoints.safe_load.file_checksum`), computed by the rank that wrote the
file from the bytes on disk after an fsync. :func:`verify` checks a tag directory against it:
the marker parses, every listed file is there with its size and checksum, every rank's state file
and a model-states file are listed. Files beside them that the manifest does not name (the
``universal/`` form a resume at a new world size derives) are not part of the checkpoint.

**Owners.** A checkpoint folder (and the run's output folder) records the run it belongs to in
:data:`OWNER_FILE`; a run with another name refuses to write there, so two runs pointed at one
folder cannot prune each other's checkpoints (:func:`claim_folder`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlkd_scale.engine.checkpoints.safe_load import file_checksum
from mlkd_scale.errors import CheckpointError

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
RANK_STATE_DIR = "rank_state"
OWNER_FILE = "mlkd_run.json"
TAG_RE = re.compile(r"^step(\d{8})$")
MODEL_STATES_RE = re.compile(r"(^|_)mp_rank_\d\d_model_states\.pt$")


def rank_state_name(rank: int) -> str:
    return f"{RANK_STATE_DIR}/rank{rank:05d}.pt"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def is_complete(tag_dir: Path) -> bool:
    return (Path(tag_dir) / COMPLETE).is_file()


def list_tags(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """All ``stepNNNNNNNN`` directories (complete or not), oldest step first."""
    if not Path(ckpt_dir).is_dir():
        return []
    found = []
    for child in Path(ckpt_dir).iterdir():
        m = TAG_RE.match(child.name)
        if m and child.is_dir():
            found.append((int(m.group(1)), child))
    return sorted(found)


def fsync_dir(path: Path) -> None:
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


# DeepSpeed merges client_state into its own top-level dict, so these names would overwrite its
# entries (the weights, the optimizer, ...) without a word; on load they are filtered back out.
DEEPSPEED_KEYS = frozenset(
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
    return {k: v for k, v in client_state.items() if k not in DEEPSPEED_KEYS}


def describe(paths: list[str | Path], tag_dir: Path) -> dict[str, dict]:
    """``{path relative to tag_dir: {"size", "crc32"}}`` of files this rank wrote into ``tag_dir``."""
    tag_dir = Path(tag_dir).resolve()
    entries = {}
    for path in paths:
        path = Path(path).resolve()
        if not path.is_relative_to(tag_dir):
            continue  # DeepSpeed writes nothing outside the tag directory through its checkpoint engine
        entries[path.relative_to(tag_dir).as_posix()] = {"size": path.stat().st_size, "crc32": file_checksum(path)}
    return entries


def read_complete(tag_dir: Path) -> dict:
    """The ``COMPLETE`` marker of ``tag_dir`` (step, world_size, time, tag, files); CheckpointError when
    it is missing or damaged."""
    path = Path(tag_dir) / COMPLETE
    try:
        marker = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: the checkpoint was never committed") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} is damaged ({type(error).__name__}: {error})") from None
    if not isinstance(marker, dict) or not isinstance(marker.get("step"), int) or not isinstance(
        marker.get("world_size"), int
    ):
        raise CheckpointError(f"{path} is damaged: it does not hold the step and the world size")
    return marker


def read_json_record(path: Path) -> dict | None:
    """A JSON object the run wrote for itself (a stage's result, a metrics cache), or None when it is
    missing or damaged (then it is computed again; a warning says so)."""
    try:
        value = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        log.warning("%s is damaged (%s); computing it again", path, error)
        return None
    if not isinstance(value, dict):
        log.warning("%s is damaged (not a JSON object); computing it again", path)
        return None
    return value


def problems(tag_dir: Path) -> list[str]:
    """What is wrong with checkpoint ``tag_dir`` (empty: it verifies), each naming the file."""
    tag_dir = Path(tag_dir)
    try:
        marker = read_complete(tag_dir)
    except CheckpointError as error:
        return [str(error)]
    files = marker.get("files")
    if not isinstance(files, dict) or not files:
        return [f"{tag_dir / COMPLETE} lists no files (a checkpoint of an older version, or damaged)"]
    found = []
    expected = [rank_state_name(r) for r in range(marker["world_size"])]
    found += [f"{tag_dir / name} is not in the manifest" for name in expected if name not in files]
    if not any(MODEL_STATES_RE.search(name) for name in files):
        found.append(f"{tag_dir / COMPLETE} lists no DeepSpeed model-states file")
    for name, entry in sorted(files.items()):
        path = tag_dir / name
        if ".." in Path(name).parts or Path(name).is_absolute() or not isinstance(entry, dict):
            found.append(f"{tag_dir / COMPLETE} lists {name!r}, which is not a file of the checkpoint")
        elif not path.is_file():
            found.append(f"{path} is missing")
        elif path.stat().st_size != entry.get("size"):
            found.append(f"{path} has {path.stat().st_size} bytes, the manifest says {entry.get('size')}")
        elif file_checksum(path) != entry.get("crc32"):
            found.append(f"{path} does not match its checksum (its bytes changed after it was written)")
    return found


def verify(tag_dir: Path) -> None:
    """Raise one CheckpointError listing every problem of ``tag_dir``; return when it verifies."""
    found = problems(tag_dir)
    if found:
        raise CheckpointError(f"checkpoint {tag_dir} does not verify: " + "; ".join(found))


def set_aside(tag_dir: Path) -> Path:
    """Rename a checkpoint that failed verification to ``<tag>.damaged[-N]``: kept for a look, never
    resumed or pruned (the name is no tag), and out of the way of the step that will be saved again."""
    target = tag_dir.with_name(tag_dir.name + ".damaged")
    n = 1
    while target.exists():
        n += 1
        target = tag_dir.with_name(f"{tag_dir.name}.damaged-{n}")
    os.rename(tag_dir, target)
    return target


def claim_folder(folder: Path, owner: str, what: str, allow_foreign: bool = False) -> None:
    """Make sure ``folder`` belongs to the run named ``owner`` (recording it on first use); else one error.

    ``allow_foreign``: a folder without a record may hold other files (a checkpoint folder of an
    older version). Without it such a folder must be empty: it holds something that is not a run's.
    Every rank may call it; only the record's first writer creates it (an exclusive create).
    """
    folder = Path(folder)
    record = folder / OWNER_FILE
    if record.is_file():
        try:
            recorded = json.loads(record.read_text()).get("run")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            recorded = None
        if recorded == owner:
            return
        raise CheckpointError(
            f"{what} {folder} belongs to another run ({record} names run {recorded!r}, this is {owner!r}); "
            f"give this run its own folder (run.output_dir / checkpoint.dir), or set run.name to "
            f"{recorded!r} if this is that run"
        )
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"{what} {folder} exists and is not a folder; choose another path")
    if folder.is_dir() and not allow_foreign:
        others = sorted(p.name for p in folder.iterdir() if not p.name.startswith((OWNER_FILE, f".{OWNER_FILE}")))
        if record.is_file():  # another rank claimed the folder since the check above (and may have written to it)
            return claim_folder(folder, owner, what)
        if others:
            raise CheckpointError(
                f"{what} {folder} already holds files that are not this run's ({', '.join(others[:5])}"
                f"{', ...' if len(others) > 5 else ''}); choose a new or empty folder (if it is this "
                f"run's folder from an older version, write {{\"run\": \"{owner}\"}} into {record})"
            )
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{OWNER_FILE}.")
    with os.fdopen(fd, "w") as f:
        json.dump({"run": owner, "created": time.time()}, f)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, record)  # publishes the whole record, and only if no rank did so first
    except FileExistsError:
        return claim_folder(folder, owner, what, allow_foreign=True)
    finally:
        os.unlink(tmp)


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
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), mode="w")
