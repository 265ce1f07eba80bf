"""Where a file stops being UTF-8, for one-line errors about task files (GLUE .tsv, SQuAD .json).

Python's ``UnicodeDecodeError`` from a text-mode read says "'utf-8' codec can't decode byte 0xe9 in
position 8191", counted from the start of whatever buffer was being decoded, and names no file. The
reader catches it and raises :func:`not_utf8` instead, which finds the first bad byte of the file
itself (its offset and line) by decoding the raw bytes again.
"""

from __future__ import annotations

import codecs
import os

from mlkd_scale.errors import DataError

_CHUNK = 1 << 20


def first_undecodable(path: str | os.PathLike) -> tuple[int, int, int] | None:
    """``(byte offset, line, byte value)`` of the first byte of ``path`` that is not UTF-8, or None.

    The file is read in chunks, so a large file costs no more memory than a chunk. A multi-byte
    character cut off by the end of the file counts as undecodable at its first byte.
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, line = 0, 1
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_CHUNK)
            pending = len(decoder.getstate()[0])  # bytes of a character begun in the previous chunk
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as error:
                at = offset - pending + error.start
                line += chunk[: max(at - offset, 0)].count(b"\n")
                f.seek(at)
                return at, line, f.read(1)[0]
            if not chunk:
                return None
            line += chunk.count(b"\n")
            offset += len(chunk)


def not_utf8(path: str | os.PathLike, what: str, kind: type[DataError] = DataError) -> DataError:
    """The error (a ``kind``) for a ``what`` file (e.g. "GLUE") that failed to decode as UTF-8: which
    byte, where, and the fix."""
    try:
        found = first_undecodable(path)
    except OSError as error:
        return kind(f"{os.fspath(path)}: cannot read this {what} file ({error.strerror or error})")
    where = f" (byte 0x{found[2]:02x} at offset {found[0]:,}, line {found[1]:,})" if found else ""
    return kind(
        f"{os.fspath(path)}: this {what} file is not UTF-8 text{where}; re-save it as UTF-8 "
        "(e.g. iconv -f <its encoding> -t utf-8 IN > OUT)"
    )
