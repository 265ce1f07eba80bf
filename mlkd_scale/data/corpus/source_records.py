"""The records of one local corpus file (text lines, JSON Lines or one JSON array, parquet rows).

Split from :mod:`mlkd_scale.data.corpus.sources`, whose module docstring has the rules for bad input that
these readers implement: a malformed *record* comes back as a :class:`Row` with its ``problem`` (the
stream skips and counts it), a malformed *first* record or an unreadable file is a
:class:`~mlkd_scale.errors.DataError` naming the file and line.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import re
import zlib
from collections.abc import Iterator
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from mlkd_scale.errors import DataError


def _open_text(file: str):
    """Open a text file for reading, decompressing by suffix.

    Undecodable bytes become lone surrogates (``surrogateescape``) so that one bad line can be
    reported and skipped instead of a UnicodeDecodeError ending the whole file; a byte-order mark
    is dropped.
    """
    opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}.get(
        os.path.splitext(file)[1].lower(), open
    )
    return opener(file, "rt", encoding="utf-8-sig", errors="surrogateescape")


UNDECODABLE = re.compile("[\udc80-\udcff]")  # bytes that were not UTF-8, as surrogateescape maps them
SURROGATE = re.compile("[\ud800-\udfff]")  # lone surrogates (also from JSON "\\ud800" escapes)
READ_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError, pa.ArrowException)


class Row(NamedTuple):
    """One record of a file: where it is ("line 7"), its value, and why it is malformed (or None)."""

    where: str
    value: Any
    problem: str | None


def kind_of(value: Any) -> str:
    names = {
        bool: "a boolean",
        int: "a number",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "an object",
        type(None): "null",
        bytes: "bytes",
    }
    return names.get(type(value), f"a {type(value).__name__}")


def _json_row(where: str, line: str) -> Row:
    if UNDECODABLE.search(line):
        return Row(where, None, f"{where} is not valid UTF-8")
    try:
        value = json.loads(line)
    except json.JSONDecodeError as e:
        return Row(where, None, f"{where} is not valid JSON ({e.msg} at column {e.colno})")
    except RecursionError:
        return Row(where, None, f"{where} is JSON nested too deeply to read")
    except ValueError as e:  # e.g. an integer with more digits than Python converts
        return Row(where, None, f"{where} is not valid JSON ({str(e).split(';')[0]})")
    if not isinstance(value, dict):
        return Row(where, None, f"{where} is {kind_of(value)}, not a JSON object")
    return Row(where, value, None)


def _json_array(file: str, text: str, first_line: int) -> list:
    """A whole-file JSON array; it cannot be resynchronised after an error, so any error is a DataError."""
    fix = "json sources must be JSON Lines (one object per line) or one JSON array of objects"
    if UNDECODABLE.search(text):
        raise DataError(f"{file}: the JSON array is not valid UTF-8 text; {fix}")
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        line = first_line + e.lineno - 1
        raise DataError(
            f"{file}: line {line} is not valid JSON ({e.msg} at column {e.colno}); {fix}"
        ) from None
    except (ValueError, RecursionError) as e:
        raise DataError(
            f"{file}: the JSON array cannot be read ({str(e).split(';')[0] or 'nested too deeply'}); {fix}"
        ) from None
    return items


def _rows(file: str, fmt: str) -> Iterator[Row]:
    """Every record of a file, malformed ones included, in file order; a broken file raises DataError."""
    if fmt == "parquet":
        number = 0
        for batch in pq.ParquetFile(file).iter_batches(batch_size=1024):
            for value in batch.to_pylist():
                number += 1
                yield Row(f"row {number}", value, None)
        return
    with _open_text(file) as f:
        if fmt == "text":
            for number, line in enumerate(f, 1):
                line = line.rstrip("\n")
                bad = f"line {number} is not valid UTF-8" if UNDECODABLE.search(line) else None
                yield Row(f"line {number}", None if bad else {"text": line}, bad)
            return
        first = True
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            if first and line.lstrip().startswith("["):  # a JSON array: the whole file is one list of records
                items = _json_array(file, line + f.read(), number)
                for index, item in enumerate(items):
                    where = f"item {index + 1} of the JSON array"
                    ok = isinstance(item, dict)
                    yield Row(
                        where,
                        item if ok else None,
                        None if ok else f"{where} is {kind_of(item)}, not an object",
                    )
                return
            first = False
            yield _json_row(f"line {number}", line)


def checked_rows(file: str, fmt: str) -> Iterator[Row]:
    """:func:`_rows` with the file-level rules: read errors and a malformed first record are DataErrors."""
    first = True
    try:
        for row in _rows(file, fmt):
            if row.problem is not None and first:
                hint = {
                    "json": "json sources must be JSON Lines (one object per line) or one JSON array of objects",
                    "text": "text sources must be UTF-8 text (is the file binary, or compressed without a "
                    ".gz/.bz2/.xz suffix?)",
                }.get(fmt, "")
                raise DataError(f"{file}: {row.problem}" + (f"; {hint}" if hint else ""))
            first = False
            yield row
    except READ_ERRORS as e:
        what = "parquet file" if fmt == "parquet" else "file"
        reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
        raise DataError(
            f"{file}: cannot read this {what} ({reason.splitlines()[0]}); is it corrupt or truncated?"
        ) from None


def read_file(file: str, fmt: str) -> Iterator[dict]:
    """The records of one local file, in file order (the order that row indices count).

    text: one record ``{"text": line}`` per line; json: JSON Lines, or one JSON array of objects;
    parquet: one record per row. Strict: a malformed record is a :class:`DataError` naming the file
    and line (the stream itself skips and counts those, see :mod:`mlkd_scale.data.corpus.sources`).
    """
    for row in checked_rows(file, fmt):
        if row.problem is not None:
            raise DataError(f"{file}: {row.problem}")
        yield row.value


def columns_of(file: str, fmt: str) -> list[str]:
    """Column names of a local file, from its schema or its first record."""
    if fmt == "parquet":
        try:
            return list(pq.ParquetFile(file).schema_arrow.names)
        except READ_ERRORS as e:
            raise DataError(
                f"{file}: cannot read this parquet file ({str(e).splitlines()[0]}); is it corrupt?"
            ) from None
    first = next(checked_rows(file, fmt), None)
    return list(first.value) if first is not None else []


def check_parquet_text(file: str, field: str) -> None:
    """A parquet text column must hold strings (or only nulls); anything else is a DataError."""
    try:
        schema = pq.ParquetFile(file).schema_arrow
    except READ_ERRORS as e:
        raise DataError(
            f"{file}: cannot read this parquet file ({str(e).splitlines()[0]}); is it corrupt?"
        ) from None
    if field in schema.names:
        kind = schema.field(field).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)):
            raise DataError(
                f"{file}: the text column {field!r} holds {kind}, not strings; set text_field to a text column"
            )
