"""Open the text sources of a :class:`~mlkd_scale.spec.DataSpec` as one streamed ``datasets`` corpus.

Every source becomes a streaming ``datasets.IterableDataset`` with the same three string columns,
so that several sources can be interleaved by weight and the whole corpus split across ranks:

* ``id``      -- a document id that is unique in the corpus and stable across runs;
* ``text``    -- the document text;
* ``orig_id`` -- the source's own ``id`` column as a string, or ``None`` when it has none.

Local sources are a sharded ``IterableDataset.from_generator`` with one shard per file (listed by
the bounded :func:`~mlkd_scale.spec.listing.list_source_files` that validation uses too), reading
each file with a small reader (:mod:`~mlkd_scale.data.corpus.source_records`: text lines, JSON Lines / JSON
array, parquet rows) rather than one
``load_dataset("json", data_files=...)`` over all files. Two reasons: the generator knows which
file and row it is on, so the id ``"<source>:<file>:<row>"`` stays the same when
``split_dataset_by_node`` hands whole files to ranks and when ``set_epoch`` reshuffles the file
order (a ``map(with_indices=True)`` index restarts on every rank and moves with the shuffle);
and ``load_dataset`` sends a download-count request to the Hub on every call, which a per-file,
per-epoch, per-resume reader must not do. ``datasets`` still records the exact position (file,
row) in its ``state_dict``; resuming re-reads the current file up to that row, so very large
corpora should come as many files rather than one.

Bad input
---------
A multi-day run should not die on one corrupt line of a scraped corpus, nor train on garbage
without saying so. So a bad *record* is skipped and counted, while a bad *file* (or the wrong
kind of file) is a :class:`DataError` naming the file and line. The rule that separates them:
the first record of a file decides what the file is; a malformed first record means the file is
not what its suffix or ``format`` says. Skipped records still take their row index (ids stay
stable) and flow through ``datasets`` with a ``malformed`` reason, so :class:`PackedStream`
counts them in ``stats()`` (``documents_skipped``; malformed ones also in
``documents_malformed``), logs the first few with file and line, and carries the counts through
``state_dict``. Resume stays exact, since the skipped rows are part of the stream's position.

=================================================  ====================================================
input                                              decision
=================================================  ====================================================
blank line in .jsonl                               not a record (JSON Lines' trailing newline); ignored
blank line in .txt, ``""`` / whitespace text       empty document: skipped, ``documents_skipped``
``"text": null``, a null in a parquet text column  empty document: skipped, ``documents_skipped``
invalid JSON line (truncated, binary, raw NUL)     malformed: skipped, ``documents_malformed``
line that is JSON but not an object (``42``)       malformed: skipped, ``documents_malformed``
record without the text field                      malformed: skipped, ``documents_malformed``
text that is a number, list, object or bytes       malformed: skipped (never cast to ``"42"``)
invalid UTF-8 bytes in a .txt / .jsonl line        malformed: skipped (never decoded with U+FFFD)
lone surrogate in JSON text (``"\\ud800"``)         malformed: skipped (UTF-8 cannot carry it)
NUL bytes inside .txt text                         kept: the tokenizer drops control characters; a line
                                                   of nothing else has no tokens and is skipped
over-long document (e.g. a 5 MB line)              kept whole: tokenized without truncation or warning
                                                   and split across as many sequences as it fills
a file's *first* record is not JSON, not an        DataError ``<file>: line N ...``: the file is not
object or not UTF-8; a .json array that does not   JSON Lines / UTF-8 text (binary? compressed
parse (it cannot be resynchronised)                without a .gz suffix?)
first record of a source lacks the text field      DataError naming the source and its columns
parquet text column of a non-string type           DataError naming the file and the column type
unreadable, corrupt or truncated file              DataError naming the file (not a raw
(parquet, .gz/.bz2/.xz, permissions)               pyarrow/gzip/OSError traceback)
every record of a rank is empty or malformed       DataError with the counts (from PackedStream)
a glob or directory too broad to list (100,000     DataError naming data.sources.N.path, the pattern
directory entries or 3 s), or matching nothing     and how to narrow it (validate says the same)
=================================================  ====================================================
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from datasets import Features, IterableDataset, Value, interleave_datasets, load_dataset
from datasets.distributed import split_dataset_by_node

from mlkd_scale.data.corpus.source_records import (
    SURROGATE,
    check_parquet_text,
    checked_rows,
    columns_of,
    kind_of,
    read_file,  # noqa: F401 - the strict reader of one file, part of this module's interface
)
from mlkd_scale.errors import DataError
from mlkd_scale.spec import DataSpec, SourceSpec
from mlkd_scale.spec.fs import PathProblem
from mlkd_scale.spec.listing import list_source_files

#: Columns of every source. ``malformed`` is None for a good record, else why it is skipped
#: ("<file>: line 7 is not valid JSON ..."); its ``text`` is then "".
FEATURES = Features(
    {
        "id": Value("string"),
        "text": Value("string"),
        "orig_id": Value("string"),
        "malformed": Value("string"),
    }
)


def source_label(spec: SourceSpec) -> str:
    """How a source is named in messages: its hub name (and config) or its path."""
    if spec.name is not None:
        return spec.name + (f" ({spec.config})" if spec.config else "")
    return str(spec.path)


def resolve_files(spec: SourceSpec, field: str = "data source") -> list[tuple[str, str]]:
    """Sorted ``(file, format)`` pairs of a local source: one file, a directory (recursive) or a glob.

    Listed by :func:`~mlkd_scale.spec.listing.list_source_files`, the bounded listing validation uses
    too. Sorting makes the file index part of the document id stable across runs and machines.
    """
    try:
        return list_source_files(field, str(spec.path), spec.format)
    except PathProblem as problem:
        raise DataError(str(problem)) from None


def _missing_field(label: str, field: str, columns) -> DataError:
    return DataError(
        f"data source {label!r} has no text field {field!r}; available columns: {sorted(columns)}; "
        "set text_field to one of them"
    )


def _utf8(text: str) -> str:
    """``text`` made storable in Arrow: lone surrogates (a non-UTF-8 file name, a JSON ``"\\ud800"``
    id) become ``\\udcxx`` escapes instead of failing deep inside ``datasets``."""
    return text if not SURROGATE.search(text) else text.encode("utf-8", "backslashreplace").decode("utf-8")


def _text_problem(where: str, field: str, text: Any) -> str | None:
    """Why a record's text value cannot be trained on (None: it can; None/"" count as empty)."""
    if text is None:
        return None
    if not isinstance(text, str):
        return f"{where}: {field!r} is {kind_of(text)}, not a string"
    if SURROGATE.search(text):
        return f"{where}: {field!r} holds a lone surrogate (invalid Unicode)"
    return None


def _local_records(files: list, text_field: str, source_index: int, label: str) -> Iterator[dict]:
    """Generator behind a local source; ``files`` is this shard's list of ``(file index, file, format)``."""
    for file_index, file, fmt in files:
        if fmt == "parquet":
            check_parquet_text(file, text_field)
        for row, (where, example, problem) in enumerate(checked_rows(file, fmt)):
            record = {
                "id": f"{source_index}:{file_index}:{row}",
                "text": "",
                "orig_id": None,
                "malformed": None,
            }
            if problem is None and text_field not in example:
                problem = f"{where} has no {text_field!r} field (it has {sorted(example)[:10]})"
            if problem is None:
                own = example.get("id")
                record["orig_id"] = None if own is None else _utf8(str(own))
                problem = _text_problem(where, text_field, example[text_field])
                if problem is None:
                    record["text"] = example[text_field] or ""
            if problem is not None:
                record["malformed"] = _utf8(f"{file}: {problem}")
            yield record


def open_local_source(spec: SourceSpec, source_index: int) -> IterableDataset:
    """A local source as a streamed dataset with one shard per file (see the module docstring)."""
    label = source_label(spec)
    pairs = resolve_files(spec, f"data.sources.{source_index}.path")
    columns: list[str] = []
    for file, fmt in pairs:  # the first file with a record (empty files have no columns)
        columns = columns_of(file, fmt)
        if columns:
            if fmt == "parquet":
                check_parquet_text(file, spec.text_field)
            break
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
        problem = _text_problem(f"{label} record {doc_id}", field, example[field])
        return {
            "id": doc_id,
            "text": "" if problem else example[field] or "",
            "orig_id": None if own is None else str(own),
            "malformed": problem,
        }

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


def count_record(record: dict, counters: dict) -> str | None:
    """The text of a streamed record worth training on, or None; counts it in ``counters``
    (``documents_read``, and ``documents_skipped`` / ``documents_malformed`` for a record that is
    malformed, empty or only whitespace)."""
    counters["documents_read"] += 1
    if record.get("malformed"):
        counters["documents_malformed"] += 1
        counters["documents_skipped"] += 1
        return None
    text = record["text"]
    if not text or text.isspace():
        counters["documents_skipped"] += 1
        return None
    return text
