"""The files of a local data source, listed once and within bounds, for validation and the run alike.

``data.sources[].path`` is a file, a directory (every file under it, recursively) or a glob. Python's
``glob.glob("/usr/**/*.nomatch", recursive=True)`` walks the whole tree before it can say "nothing"
and cannot be stopped half-way (it yields only matches), so a too-broad pattern hung validation for
minutes. :func:`list_source_files` walks with ``os.scandir`` itself and counts every directory entry
it looks at: past :data:`MAX_LISTED_ENTRIES` entries or :data:`MAX_LISTING_SECONDS` seconds it stops
with a :class:`~mlkd_scale.spec.fs.PathProblem` naming the field, the pattern and how to narrow it.
``mlkd-scale validate`` (:mod:`mlkd_scale.spec.paths`) and the run (:mod:`mlkd_scale.data.corpus.sources`)
both call it, so they agree on which files a source has.

Glob rules are ``glob.glob``'s with ``recursive=True``: ``**`` (a whole component) matches zero or
more directories, wildcards do not match names starting with ``.`` unless the pattern component does,
and symbolic links to directories are followed (but never into a directory the link is inside of,
so a loop of links ends). A directory lists like ``os.walk``: files of every non-hidden
subdirectory, hidden files and links to directories left out.
"""

from __future__ import annotations

import fnmatch
import glob
import os
import time

from mlkd_scale.spec.fs import PathProblem, expand, inspect_path, shown

#: Directory entries one listing may look at, and seconds it may take, before it gives up.
MAX_LISTED_ENTRIES = 100_000
MAX_LISTING_SECONDS = 3.0

#: File suffix -> reader format. Compression suffixes (text and json only) are looked through.
SUFFIX_FORMATS = {
    ".txt": "text",
    ".text": "text",
    ".jsonl": "json",
    ".json": "json",
    ".ndjson": "json",
    ".parquet": "parquet",
}
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz")
_KNOWN = ".txt/.jsonl/.json/.parquet"


class _TooBroad(Exception):
    pass


class _Budget:
    """Counts the directory entries a listing looked at and the time it took; raises past the limits."""

    def __init__(self, max_entries: int, max_seconds: float):
        self.max_entries, self.max_seconds = max_entries, max_seconds
        self.entries = 0
        self.start = time.monotonic()
        self.deadline = self.start + max_seconds
        self.last: tuple[str, list[os.DirEntry]] | None = None  # the latest scan (read again by "**/x")

    def tick(self) -> None:
        self.entries += 1
        if self.entries > self.max_entries or time.monotonic() > self.deadline:
            raise _TooBroad

    def elapsed(self) -> float:
        return time.monotonic() - self.start


def _scan(directory: str, budget: _Budget) -> list[os.DirEntry]:
    """The entries of ``directory`` (none when it cannot be read, as ``glob`` skips such directories)."""
    if budget.last is not None and budget.last[0] == directory:
        return budget.last[1]
    entries: list[os.DirEntry] = []
    try:
        with os.scandir(directory or ".") as found:
            for entry in found:
                budget.tick()
                entries.append(entry)
    except (OSError, ValueError):
        entries = []
    budget.last = (directory, entries)
    return entries


def _is(entry: os.DirEntry, kind: str, follow: bool = True) -> bool:
    try:
        return entry.is_dir(follow_symlinks=follow) if kind == "dir" else entry.is_file()
    except OSError:
        return False


def _identity(path: str) -> tuple[int, int] | None:
    try:
        found = os.stat(path or ".")
    except (OSError, ValueError):
        return None
    return found.st_dev, found.st_ino


def _walk(base: str, parts: list[str], budget: _Budget, follow_links: bool) -> set[str]:
    """Files under ``base`` matching the components ``parts`` (``glob`` semantics, see module doc)."""
    out: set[str] = set()
    stack: list[tuple[str, int, tuple]] = [(base, 0, ())]
    while stack:
        directory, i, above = stack.pop()
        part, last = parts[i], i == len(parts) - 1
        if part == "**":
            here = _identity(directory)
            if here is None or here in above:  # unreadable, or a link back into its own parent chain
                continue
            for entry in _scan(directory, budget):
                if entry.name.startswith("."):
                    continue
                if _is(entry, "dir", follow_links):
                    stack.append((os.path.join(directory, entry.name), i, (*above, here)))
                elif last and _is(entry, "file"):
                    out.add(os.path.join(directory, entry.name))
            if not last:  # popped next, so the rest of the pattern reads this directory's scan again
                stack.append((directory, i + 1, above))
        elif glob.has_magic(part):
            hidden_ok = part.startswith(".")
            for entry in _scan(directory, budget):
                if (hidden_ok or not entry.name.startswith(".")) and fnmatch.fnmatchcase(entry.name, part):
                    path = os.path.join(directory, entry.name)
                    if last and _is(entry, "file"):
                        out.add(path)
                    elif not last and _is(entry, "dir"):
                        stack.append((path, i + 1, above))
        else:
            budget.tick()
            path = os.path.join(directory, part)
            if last and os.path.isfile(path):
                out.add(path)
            elif not last:
                stack.append((path, i + 1, above))
    return out


def _split(pattern: str) -> tuple[str, list[str]]:
    """``pattern`` as the directory before its first wildcard and the components from there on."""
    parts = pattern.split(os.sep)
    base = os.sep if pattern.startswith(os.sep) else ""
    parts = [p for p in parts if p] if base else parts
    while len(parts) > 1 and not glob.has_magic(parts[0]):
        base = os.path.join(base, parts.pop(0))
    collapsed: list[str] = []
    for part in parts:  # "**/**" is "**"
        if not (part == "**" and collapsed[-1:] == ["**"]):
            collapsed.append(part)
    return base, collapsed


def list_files(
    field: str, value: str, max_entries: int | None = None, max_seconds: float | None = None
) -> list[str]:
    """Sorted files of a source path: the glob's matches, every file under a directory, or the file.

    Empty when nothing is there; a path that cannot be looked at, or a listing past the bounds
    (default :data:`MAX_LISTED_ENTRIES`, :data:`MAX_LISTING_SECONDS`), is a :class:`PathProblem`
    naming ``field``. Sorted, so file indices (part of document ids) are stable.
    """
    max_entries = MAX_LISTED_ENTRIES if max_entries is None else max_entries
    max_seconds = MAX_LISTING_SECONDS if max_seconds is None else max_seconds
    fix = "give an existing file, directory or glob"
    pattern = expand(field, value)
    is_glob = glob.has_magic(pattern)
    if not is_glob:
        kind = inspect_path(field, value, fix).kind
        if kind == "other":
            raise PathProblem(f"{field}: {shown(value)} is not a regular file or a directory; {fix}")
        if kind != "dir":
            return [pattern] if kind == "file" else []
    base, parts = _split(pattern) if is_glob else (pattern, ["**", "*"])
    budget = _Budget(max_entries, max_seconds)
    try:
        if is_glob and base:
            inspect_path(field, base, fix)  # a base that cannot be looked at is its own problem
        return sorted(_walk(base, parts, budget, follow_links=is_glob))
    except _TooBroad:
        what = f"glob {shown(value)}" if is_glob else f"directory {shown(value)}"
        raise PathProblem(
            f"{field}: stopped listing the files of {what} after {budget.entries - 1:,} directory entries and "
            f"{budget.elapsed():.1f} s without finishing (a listing may take {max_entries:,} entries or "
            f"{max_seconds:g} s); narrow it: start the pattern at the directory that holds the corpus "
            "(/data/corpus/**/*.jsonl, not /**/*.jsonl), drop the ** if the files are in one directory, or "
            "split the files over several sources"
        ) from None


def file_format(path: str, fmt: str) -> str | None:
    """The reader for ``path``: the declared format, else read from the suffix (None if unknown)."""
    if fmt != "auto":
        return fmt
    name = path.lower()
    for suffix in COMPRESSION_SUFFIXES:
        name = name.removesuffix(suffix)
    return SUFFIX_FORMATS.get(os.path.splitext(name)[1])


def list_source_files(field: str, value: str, fmt: str = "auto") -> list[tuple[str, str]]:
    """Sorted ``(file, format)`` pairs of a local source, or one :class:`PathProblem` naming ``field``.

    Files of an unknown suffix under a directory or glob are left out; ``fmt`` other than "auto"
    reads every file in that format.
    """
    files = list_files(field, value)
    if not files:
        if glob.has_magic(value):
            raise PathProblem(
                f"{field}: glob {shown(value)} matches no files; fix the pattern or the directory"
            )
        raise PathProblem(f"{field}: {shown(value)} does not exist; give an existing file, directory or glob")
    pairs = [(file, file_format(file, fmt)) for file in files]
    if len(files) == 1 and files[0] == expand(field, value) and pairs[0][1] is None:
        raise PathProblem(
            f"{field}: cannot tell the format of {shown(value)} from its suffix; set format to text, json or parquet"
        )
    known = [(file, kind) for file, kind in pairs if kind is not None]
    if not known:
        raise PathProblem(
            f"{field}: {shown(value)} matched no {_KNOWN} files ({len(files)} of other kinds, e.g. "
            f"{shown(os.path.basename(files[0]), 40)}); check the path or the glob, or set format"
        )
    return known
