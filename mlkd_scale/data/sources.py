"""Open the text sources of a :class:`~mlkd_scale.spec.DataSpec` as one streamed ``datasets`` corpus.

Every source becomes a streaming ``datasets.IterableDataset`` with the same three string columns,
so that several sources can be interleaved by weight and the whole corpus split across ranks:

* ``id``      -- a document id that is unique in the corpus and stable across runs;
* ``text``    -- the document text;
* ``orig_id`` -- the source's own ``id`` column as a string, or ``None`` when it has none.

Local sources are a sharded ``IterableDataset.from_generator`` with one shard per file, reading
each file with a small reader (text lines, JSON Lines / JSON array, parquet rows) rather than one
``load_dataset("json", data_files=...)`` over all files. Two reasons: the generator knows which
file and row it is on, so the id ``"<source>:<file>:<row>"`` stays the same when
``split_dataset_by_node`` hands whole files to ranks and when ``set_epoch`` reshuffles the file
order (a ``map(with_indices=True)`` index restarts on every rank and moves with the shuffle);
and ``load_dataset`` sends a download-count request to the Hub on every call, which a per-file,
per-epoch, per-resume reader must not do. ``datasets`` still records the exact position (file,
row) in its ``state_dict``; resuming re-reads the current file up to that row, so very large
corpora should come as many files rather than one.
"""

from __future__ import annotations

import bz2
import glob
import gzip
import json
import lzma
import os
from collections.abc import Iterator

import pyarrow.parquet as pq
from datasets import Features, IterableDataset, Value, interleave_datasets, load_dataset
from datasets.distributed import split_dataset_by_node

from mlkd_scale.spec import DataSpec, SourceSpec

FEATURES = Features({"id": Value("string"), "text": Value("string"), "orig_id": Value("string")})

# File suffix -> reader format. Compression suffixes (text and json only) are looked through.
SUFFIX_FORMATS = {
    ".txt": "text",
    ".text": "text",
    ".jsonl": "json",
    ".json": "json",
    ".ndjson": "json",
    ".parquet": "parquet",
}
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz")


class DataError(ValueError):
    """A problem with the user's data sources, stated in one sentence with the fix."""


def source_label(spec: SourceSpec) -> str:
    """How a source is named in messages: its hub name (and config) or its path."""
    if spec.name is not None:
        return spec.name + (f" ({spec.config})" if spec.config else "")
    return str(spec.path)


def _file_format(path: str, fmt: str) -> str | None:
    """The reader for ``path``: the declared format, else read from the suffix (None if unknown)."""
    if fmt != "auto":
        return fmt
    name = path.lower()
    for comp in COMPRESSION_SUFFIXES:
        if name.endswith(comp):
            name = name[: -len(comp)]
    return SUFFIX_FORMATS.get(os.path.splitext(name)[1])


def resolve_files(spec: SourceSpec) -> list[tuple[str, str]]:
    """Sorted ``(file, format)`` pairs of a local source: one file, a directory (recursive) or a glob.

    Sorting makes the file index part of the document id stable across runs and machines.
    """
    path = os.path.expanduser(str(spec.path))
    if any(ch in path for ch in "*?["):
        candidates = [p for p in glob.glob(path, recursive=True) if os.path.isfile(p)]
    elif os.path.isdir(path):
        candidates = []
        for root, dirs, files in os.walk(path):
            dirs[:] = [d for d in dirs if not d.startswith(".")]  # no .cache, .git, ...
            candidates += [os.path.join(root, f) for f in files if not f.startswith(".")]
    elif os.path.isfile(path):
        candidates = [path]
    else:
        candidates = []
    explicit_file = os.path.isfile(path)
    pairs = []
    for file in sorted(candidates):
        fmt = _file_format(file, spec.format)
        if fmt is None and explicit_file:
            raise DataError(
                f"data source {path!r}: cannot tell the format from the suffix; "
                "set format to text, json or parquet"
            )
        if fmt is not None:
            pairs.append((file, fmt))
    if not pairs:
        raise DataError(
            f"data source {path!r} matched no .txt/.jsonl/.json/.parquet files; check the path or the glob"
        )
    return pairs


def _open_text(file: str):
    """Open a text file for reading, decompressing by suffix."""
    opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}.get(
        os.path.splitext(file)[1].lower(), open
    )
    return opener(file, "rt", encoding="utf-8")


def read_file(file: str, fmt: str) -> Iterator[dict]:
    """The records of one local file, in file order (the order that row indices count).

    text: one record ``{"text": line}`` per line; json: JSON Lines, or one JSON array of objects;
    parquet: one record per row.
    """
    if fmt == "parquet":
        for batch in pq.ParquetFile(file).iter_batches(batch_size=1024):
            yield from batch.to_pylist()
        return
    with _open_text(file) as f:
        if fmt == "text":
            for line in f:
                yield {"text": line.rstrip("\n")}
            return
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                if line.lstrip().startswith("["):  # a JSON array: the whole file is one list of records
                    yield from json.loads(line + f.read())
                    return
                yield json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{file}: line {number} is not valid JSON ({e}); json sources must be JSON Lines "
                    "(one object per line) or one JSON array of objects"
                ) from None


def _columns(file: str, fmt: str) -> list[str]:
    """Column names of a local file, from its schema or its first record."""
    if fmt == "parquet":
        return list(pq.ParquetFile(file).schema_arrow.names)
    first = next(read_file(file, fmt), None)
    return list(first) if isinstance(first, dict) else []


def _missing_field(label: str, field: str, columns) -> DataError:
    return DataError(
        f"data source {label!r} has no text field {field!r}; available columns: {sorted(columns)}; "
        "set text_field to one of them"
    )


def _local_records(files: list, text_field: str, source_index: int, label: str) -> Iterator[dict]:
    """Generator behind a local source; ``files`` is this shard's list of ``(file index, file, format)``."""
    for file_index, file, fmt in files:
        for row, example in enumerate(read_file(file, fmt)):
            if not isinstance(example, dict) or text_field not in example:
                raise _missing_field(
                    f"{label} ({file}, row {row})", text_field, getattr(example, "keys", list)()
                )
            own = example.get("id")
            yield {
                "id": f"{source_index}:{file_index}:{row}",
                "text": example[text_field] or "",
                "orig_id": None if own is None else str(own),
            }


def open_local_source(spec: SourceSpec, source_index: int) -> IterableDataset:
    """A local source as a streamed dataset with one shard per file (see the module docstring)."""
    label = source_label(spec)
    pairs = resolve_files(spec)
    columns = _columns(*pairs[0])
    if spec.text_field not in columns:
        raise _missing_field(label, spec.text_field, columns)
    files = [(i, file, fmt) for i, (file, fmt) in enumerate(pairs)]
    return IterableDataset.from_generator(
        _local_records,
        features=FEATURES,
        gen_kwargs={
            "files": files,
            "text_field": spec.text_field,
            "source_index": source_index,
            "label": label,
        },
    )


def open_hub_source(spec: SourceSpec, source_index: int, rank: int = 0) -> IterableDataset:
    """A hub dataset streamed with ``load_dataset(name, config, split=..., streaming=True)``.

    The id is the dataset's own ``id`` column when it has one. Otherwise it is the running index of
    the record as this rank sees it (prefixed with the rank, because ``split_dataset_by_node`` may
    give each rank its own shards and restart the count): unique within an epoch, but not the same
    document in another epoch or at another world size, since ``set_epoch`` reshuffles shards.
    """
    label = source_label(spec)
    ds = load_dataset(spec.name, spec.config, split=spec.split, streaming=True)
    columns = ds.column_names
    if columns is not None and spec.text_field not in columns:
        raise _missing_field(label, spec.text_field, columns)
    field = spec.text_field

    def to_record(example: dict, index: int) -> dict:
        if field not in example:
            raise _missing_field(label, field, example.keys())
        own = example.get("id")
        doc_id = f"{source_index}:{own}" if own is not None else f"{source_index}:r{rank}:{index}"
        return {"id": doc_id, "text": example[field] or "", "orig_id": None if own is None else str(own)}

    ds = ds.map(to_record, with_indices=True, remove_columns=columns, features=FEATURES)
    if columns is None:
        ds = ds.select_columns(list(FEATURES))
    return ds


def open_source(spec: SourceSpec, source_index: int, rank: int = 0) -> IterableDataset:
    """One source as a streamed dataset with the columns of :data:`FEATURES`."""
    if spec.path is not None:
        return open_local_source(spec, source_index)
    return open_hub_source(spec, source_index, rank)


def open_corpus(data: DataSpec, rank: int, world_size: int, seed: int) -> IterableDataset:
    """All sources, interleaved by weight and split across ranks: this rank's part of the corpus.

    ``all_exhausted`` keeps drawing from every source until each has been read once, so a small
    source is oversampled (repeated) rather than dropped when its turn is up.
    """
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is outside world size {world_size}")
    sets = [open_source(s, i, rank) for i, s in enumerate(data.sources)]
    if len(sets) == 1:
        ds = sets[0]
    else:
        total = sum(s.weight for s in data.sources)
        ds = interleave_datasets(
            sets,
            probabilities=[s.weight / total for s in data.sources],
            seed=seed,
            stopping_strategy="all_exhausted",
        )
    if world_size > 1:
        ds = split_dataset_by_node(ds, rank=rank, world_size=world_size)
    return ds
