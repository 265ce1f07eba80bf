"""Teacher cache for task distillation: the frozen teacher's outputs computed once per stage, read every epoch.

Why: a task stage runs the same frozen teacher on the same train set every epoch (the quick-start:
10 + 10 epochs; the paper: 20 epochs of Stage 1 on augmented data, 3 of Stage 2), and on CPU the
teacher's forward is most of a step. The teacher is in eval mode (no dropout) and a sample's inputs
are its fixed token ids, padded to ``task.max_seq_length`` when the split is encoded, so the teacher's
outputs for a sample are the same in every epoch: computing them once changes no loss.

What is cached, per stage: exactly the features that stage's losses read (its teacher ``TapRequest``),
one row per sample, in two kinds:

* pooled — ``cls`` [d] and ``logits`` [C] (SQuAD: [2, L]): always cached, in ``teacher.dtype``
  (lossless);
* per token — ``embeddings``, ``hidden.n``, ``context.n``, ``qkv.n.q|k|v`` ([L, d]) and attention maps
  ([H, L, L]): cached when their total size over the split, in ``teacher.cache_dtype``, is at most
  ``teacher.cache_max_gib``; otherwise the stage runs the live teacher and says why (a cache of the
  pooled rows alone would not spare the forward).

Key: sha256 of ``{format, teacher, data, max_seq_length, stage, preset, request, fields, world_size}``:
``teacher`` digests its class, config and every weight as loaded (so a re-trained teacher at the same
path is a new key); ``data`` digests the encoded model inputs of the stage's train split (which covers
the data files, the augmentation cache, the tokenizer and the max length); ``request`` is what the
losses read (terms, preset and mapped layers decide it); ``fields`` the shapes and storage dtypes.
Another key is another directory; rank 0 deletes the stage's caches of other keys. Layout::

    <run.output_dir>/teacher_cache/<stage>-<key[:16]>/
        key.json      the key's parts;  build.json  {seconds, rows, token_bytes}
        rank00000/    one shard per rank (:mod:`~mlkd_scale.engine.task.teacher_cache_store`: written in
        rank00001/    place, committed every ~COMMIT_ROWS rows, COMPLETE written last)

Sharding: :class:`~mlkd_scale.tasks.sampler.EpochSampler` gives each rank a *different* subset every
epoch (a fresh permutation split ``perm[rank::world]``), so over the epochs every rank needs every
sample. Each rank therefore *computes* one fixed shard — samples ``i`` with ``i % world == rank``, at row
``i // world`` — so the work is split evenly and each sample is run once, and *reads* every shard,
memory-mapped, from the run's output directory (which all ranks share, as the checkpoints require).
Caching only what a rank sees in epoch 0 would miss its samples of epoch 1; each rank caching all
samples would run the teacher world-size times over.

Build: before the stage's first step, each rank runs the stage's own ``FeatureTap`` over its shard in
batches of ``task.eval_batch_size``. A killed build resumes after the last committed batch of the
slowest rank — every rank restarts at the same batch because a ZeRO-3 teacher's forward is collective
(the other ranks then run the forward without writing). Rows after a shard's last commit are always
recomputed (the commit is recorded only after the rows before it were fsynced); a shard whose key,
fields or file sizes do not match is deleted and rebuilt, never read. A resumed or later launch finds
every shard COMPLETE for its key and reuses them without running the teacher.

Memory: the size rule bounds the whole cache (all shards), since every rank maps all of them; the
mapped pages are the operating system's page cache, shared by the ranks of a node.

Exactness: a batch's features are gathered by sample index from rows the same teacher computed for
the same inputs. Stored in ``teacher.dtype`` they equal the live teacher's bit for bit where the
kernels do not depend on the batch's composition (tested on CPU; there, a matmul of fewer than 4 rows
takes another kernel that differs in the last bit, so builds run full batches and bit-equality with a
live teacher needs micro batches of 4 or more — the live teacher's own outputs differ that much between
batch sizes); ``fp16`` storage of an fp32 teacher (``cache_dtype: auto``) rounds each per-token value to
11 significant bits.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from mlkd_scale.engine.checkpoints.files import atomic_write_text
from mlkd_scale.engine.task.teacher_cache_store import (
    STORAGE,
    FieldSpec,
    ShardWriter,
    from_storage,
    open_shard,
    shard_dir,
    to_storage,
)
from mlkd_scale.models.distillation_module import MODEL_INPUTS
from mlkd_scale.models.taps import Features, FeatureTap
from mlkd_scale.spec import SpecError
from mlkd_scale.tasks.base import EncodedSplit

FORMAT = 1
CACHE_DIR = "teacher_cache"
COMMIT_ROWS = 1024  # rows between two commits of a shard (each commit fsyncs every field's file)
POOLED = frozenset({"cls", "logits"})
_STORAGE_NAME = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_CACHE_DTYPE = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


# ---- features as named rows -------------------------------------------------------------------


def flat_features(features: Features) -> dict[str, torch.Tensor]:
    """The captured tensors by field name (``embeddings``, ``hidden.3``, ``qkv.3.k``, ``cls``, ...)."""
    flat: dict[str, torch.Tensor] = {}
    for kind in ("embeddings", "cls", "logits"):
        if getattr(features, kind) is not None:
            flat[kind] = getattr(features, kind)
    for kind in ("context", "hidden", "attentions", "attention_scores"):
        flat.update({f"{kind}.{n}": t for n, t in getattr(features, kind).items()})
    for n, parts in features.qkv.items():
        flat.update({f"qkv.{n}.{p}": t for p, t in zip("qkv", parts, strict=True)})
    return flat


def unflat_features(flat: dict[str, torch.Tensor]) -> Features:
    """The inverse of :func:`flat_features`."""
    features, qkv = Features(), {}
    for name, tensor in flat.items():
        kind, _, rest = name.partition(".")
        if kind in ("embeddings", "cls", "logits"):
            setattr(features, kind, tensor)
        elif kind == "qkv":
            layer, part = rest.split(".")
            qkv.setdefault(int(layer), {})[part] = tensor
        else:
            getattr(features, kind)[int(rest)] = tensor
    features.qkv = {n: (p["q"], p["k"], p["v"]) for n, p in qkv.items()}
    return features


def field_specs(probe: dict[str, torch.Tensor], cache_dtype: str) -> dict[str, FieldSpec]:
    """Shape and storage dtype of every field, from one forward's features (see the module docstring)."""
    fields = {}
    for name, tensor in probe.items():
        live = _STORAGE_NAME[tensor.dtype]
        if name in POOLED or cache_dtype == "auto":
            dtype = live if name in POOLED or live != "float32" else "float16"
        else:
            dtype = _CACHE_DTYPE[cache_dtype]
        fields[name] = FieldSpec(tuple(tensor.shape[1:]), dtype)
    return fields


def token_bytes(fields: dict[str, FieldSpec], rows: int) -> int:
    """Bytes of the per-token fields of ``rows`` samples (what ``teacher.cache_max_gib`` bounds)."""
    return rows * sum(spec.row_bytes for name, spec in fields.items() if name not in POOLED)


# ---- the key ----------------------------------------------------------------------------------


def _digest(named: Iterable[tuple[str, torch.Tensor]], hasher) -> None:
    for name, tensor in named:
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        hasher.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)};".encode())
        hasher.update(memoryview(flat.view(torch.uint8).numpy()))


def _rank0_hex(compute, device: torch.device) -> str:
    """``compute()`` (a 64-character hex digest) on rank 0, the same string on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return compute()
    buf = torch.zeros(64, dtype=torch.uint8, device=device)
    if dist.get_rank() == 0:
        buf.copy_(torch.tensor(list(compute().encode()), dtype=torch.uint8))
    dist.broadcast(buf, 0)
    return bytes(buf.cpu().tolist()).decode()


def teacher_fingerprint(model: torch.nn.Module, device: torch.device) -> str:
    """sha256 of the teacher's class, config and every tensor of its state dict (before placement)."""

    def compute() -> str:
        hasher = hashlib.sha256(f"{type(model).__name__}\n{model.config.to_json_string()}".encode())
        _digest(sorted(model.state_dict().items()), hasher)
        return hasher.hexdigest()

    return _rank0_hex(compute, device)


def data_fingerprint(split: EncodedSplit, device: torch.device) -> str:
    """sha256 of the split's encoded model inputs (what the teacher reads), in order."""

    def compute() -> str:
        hasher = hashlib.sha256(f"{len(split)}\n".encode())
        _digest(((k, split.tensors[k]) for k in MODEL_INPUTS if k in split.tensors), hasher)
        return hasher.hexdigest()

    return _rank0_hex(compute, device)


def request_json(tap: FeatureTap) -> dict:
    return {k: sorted(v) if isinstance(v, frozenset) else v for k, v in dataclasses.asdict(tap.request).items()}


# ---- reading ----------------------------------------------------------------------------------


class TeacherCache:
    """Every rank's shard, memory-mapped; :meth:`features` gathers a batch's rows by sample index."""

    def __init__(self, shards: list[dict[str, np.ndarray]], fields: dict[str, FieldSpec],
                 live_dtypes: dict[str, torch.dtype], device: torch.device, directory: Path | None = None):
        self.shards, self.fields, self.live_dtypes = shards, fields, live_dtypes
        self.device, self.directory = device, directory

    def features(self, index: torch.Tensor) -> Features:
        """The teacher's features of samples ``index`` [B], as the live tap returns them (dtype, device).

        Sample ``i`` is row ``i // W`` of shard ``i % W`` (W = the number of shards).
        """
        idx = np.asarray(index.cpu(), dtype=np.int64)
        world = len(self.shards)
        shard, row = idx % world, idx // world
        groups = [(s, shard == s) for s in np.unique(shard)]
        flat = {}
        for name, spec in self.fields.items():
            out = np.empty((len(idx), *spec.shape), STORAGE[spec.dtype][0])
            for s, sel in groups:
                out[sel] = self.shards[s][name][row[sel]]
            flat[name] = from_storage(out, spec.dtype).to(self.device, self.live_dtypes[name])
        return unflat_features(flat)


# ---- building ---------------------------------------------------------------------------------


def _teacher_forward(tap: FeatureTap, split: EncodedSplit, rows: list[int], device,
                     fill_to: int = 0) -> dict[str, torch.Tensor]:
    """The teacher's features of ``rows``; the batch is filled up to ``fill_to`` rows with repeats of
    the first (their results dropped), so that every forward of a build has one shape."""
    batch = split.batch(rows + rows[:1] * (fill_to - len(rows)), device)
    with torch.no_grad():
        flat = flat_features(tap(**{k: batch[k] for k in MODEL_INPUTS if k in batch}))
    return {name: tensor[: len(rows)] for name, tensor in flat.items()}


def _all_reduce(value: float, op, device) -> float:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=op)
    return float(tensor.item())


def build_shard(tap: FeatureTap, split: EncodedSplit, writer: ShardWriter, rank: int, world: int,
                batch_size: int, collective: bool, device, progress: bool = False) -> None:
    """Run the teacher over this rank's samples ``rank, rank + W, ...`` into ``writer`` (resumably).

    Every rank loops over the same batch numbers (``ceil(ceil(N / W) / batch_size)`` of them, from
    the slowest rank's resume point); with ``collective`` (a ZeRO-3 teacher) every rank runs every
    forward, a rank without rows of its own (or with them committed already) discarding the result.
    Every forward has ``batch_size`` rows (the last one filled up): some CPU matmul kernels round
    differently below 4 rows, and a live teacher's batches are full micro batches.
    """
    rows = list(range(rank, len(split), world))
    batches = math.ceil(math.ceil(len(split) / world) / batch_size)
    mine = batches if writer.rows_done >= len(rows) else writer.rows_done // batch_size
    start = int(_all_reduce(mine, dist.ReduceOp.MIN, device))
    every = max(1, COMMIT_ROWS // batch_size)
    error: OverflowError | None = None
    for b in tqdm(range(start, batches), disable=not progress, desc="teacher cache", unit="batch"):
        lo = b * batch_size
        chunk = rows[lo : lo + batch_size]
        needed = bool(chunk) and lo >= writer.rows_done and error is None
        if not (needed or collective):
            continue
        flat = _teacher_forward(tap, split, chunk or [0], device, fill_to=batch_size)
        if not needed:
            continue
        try:
            writer.write(lo, {name: to_storage(flat[name], spec.dtype) for name, spec in writer.fields.items()})
        except OverflowError as overflow:
            error = overflow
            continue
        if (b + 1 - start) % every == 0:
            writer.commit(lo + len(chunk))
    if _all_reduce(float(error is not None), dist.ReduceOp.MAX, device):
        writer.close()
        raise SpecError(str(error) if error else "teacher.cache_dtype: another rank's teacher features "
                        "exceed the range of the cache dtype; set teacher.cache_dtype to bf16 or fp32")
    writer.complete()


def _prune_other_keys(root: Path, stage: str, keep: Path) -> None:
    for old in root.glob(f"{stage}-*"):
        if old != keep and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)


def _shard_rows(size: int, rank: int, world: int) -> int:
    return len(range(rank, size, world))


def _key(ctx, stage: str, tap: FeatureTap, split: EncodedSplit, teacher_id: str, fields) -> tuple[str, dict]:
    """The cache key (a sha256 hex digest) and the parts it digests (see the module docstring)."""
    spec, info = ctx.spec, ctx.dist
    parts = {
        "format": FORMAT, "teacher": teacher_id, "data": data_fingerprint(split, info.device),
        "max_seq_length": spec.task.max_seq_length, "stage": stage, "preset": spec.losses.preset,
        "request": request_json(tap), "fields": {k: v.as_json() for k, v in sorted(fields.items())},
        "world_size": info.world_size,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest(), parts


def _open_shards(directory: Path, key: str, fields, size: int, info) -> list[dict[str, np.ndarray]]:
    shards = []
    for rank in range(info.world_size):
        arrays = open_shard(shard_dir(directory, rank), key, _shard_rows(size, rank, info.world_size), fields)
        if arrays is None:
            raise RuntimeError(f"rank {info.rank} cannot read rank {rank}'s teacher cache in {directory}; "
                               "every rank must see the same run.output_dir (a shared file system)")
        shards.append(arrays)
    return shards


def open_teacher_cache(
    ctx, stage: str, tap: FeatureTap, split: EncodedSplit, teacher_id: str
) -> TeacherCache | None:
    """The stage's cache (built, or its build completed, now if needed), or None: run the live teacher.

    ``ctx`` is the run's :class:`~mlkd_scale.engine.task.stage.TaskContext`; ``teacher_id`` is
    :func:`teacher_fingerprint` of the teacher ``tap`` runs. Every rank calls this.
    """
    spec, info = ctx.spec, ctx.dist
    probe = _teacher_forward(tap, split, [0], info.device)  # every rank: a ZeRO-3 forward is collective
    fields = field_specs(probe, spec.teacher.cache_dtype)
    if not fields:
        ctx.print(f"{stage}: the losses read nothing from the teacher; it is not run")
        return TeacherCache([{}] * info.world_size, {}, {}, info.device)
    size, limit = token_bytes(fields, len(split)), spec.teacher.cache_max_gib
    if size > limit * 2**30:
        ctx.print(f"{stage}: live teacher: the per-token features its losses read take {_size_text(size)} "
                  f"over {len(split):,} examples, more than teacher.cache_max_gib = {limit:g}")
        return None
    key, parts = _key(ctx, stage, tap, split, teacher_id, fields)
    directory = ctx.output_dir / CACHE_DIR / f"{stage}-{key[:16]}"
    if info.is_main:
        _prune_other_keys(directory.parent, stage, directory)
        atomic_write_text(directory / "key.json", json.dumps(parts, indent=1, sort_keys=True) + "\n")
    dist.barrier()
    started = time.perf_counter()
    writer = ShardWriter(shard_dir(directory, info.rank), key, _shard_rows(len(split), info.rank, info.world_size),
                         fields)
    built = _all_reduce(float(not writer.finished), dist.ReduceOp.MAX, info.device)
    if built:
        build_shard(tap, split, writer, info.rank, info.world_size, spec.task.eval_batch_size,
                    spec.teacher.placement == "zero3", info.device, info.is_main and spec.logging.progress_bar)
    writer.close()
    seconds = _all_reduce(time.perf_counter() - started, dist.ReduceOp.MAX, info.device)
    dist.barrier()
    shards = _open_shards(directory, key, fields, len(split), info)
    _report(ctx, stage, directory, fields, len(split), size, seconds if built else None)
    live = {name: tensor.dtype for name, tensor in probe.items()}
    return TeacherCache(shards, fields, live, info.device, directory)


def _size_text(size: int) -> str:
    return f"{size / 2**30:,.2f} GiB" if size >= 2**30 else f"{size / 2**20:,.2f} MiB"


def _report(ctx, stage: str, directory: Path, fields: dict[str, FieldSpec], rows: int, size: int,
            seconds: float | None) -> None:
    kinds = Counter(name.split(".")[0] for name in fields)
    what = ", ".join(kind if n == 1 else f"{kind} x{n}" for kind, n in kinds.items()) + f" of {rows:,} examples"
    dtypes = sorted({spec.dtype for name, spec in fields.items() if name not in POOLED})
    if dtypes:
        what += f"; per-token {_size_text(size)} in {', '.join(dtypes)}"
    if seconds is None:
        ctx.print(f"{stage}: teacher cache reused ({what}): {directory}")
        return
    ctx.print(f"{stage}: teacher cache built in {seconds:.1f} s ({what}): {directory}")
    if ctx.dist.is_main:
        report = {"seconds": seconds, "rows": rows, "token_bytes": size}
        atomic_write_text(directory / "build.json", json.dumps(report, indent=1) + "\n")
