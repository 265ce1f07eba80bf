"""Validation's one door to the file system: every path of a spec is looked at by :func:`inspect_path`.

pathlib and ``os`` raise for much that a user can type into a spec field: ``RuntimeError`` for
``~nosuchuser/x`` (no such home directory), ``OSError`` for a name longer than the file system takes
(ENAMETOOLONG), a directory on the way that may not be read (EACCES), a loop of symbolic links
(ELOOP), ``ValueError`` for a NUL byte or a lone surrogate. A check that lets one of them through
ends ``mlkd-scale validate`` in a traceback, so no check calls ``Path.exists``/``is_dir`` itself:
each asks :func:`inspect_path` (or :func:`output_dir_problems`), which turns every such error into
one :class:`PathProblem` line naming the field and the fix.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

#: The longest file name (one path component) that common file systems take, in bytes.
NAME_MAX = 255

Kind = Literal["dir", "file", "other", "missing"]


class PathProblem(ValueError):
    """A spec path that cannot be used, as one line ``"<field>: <what is wrong>; <the fix>"``."""


@dataclass(frozen=True)
class PathInfo:
    """What a spec path names: the path with ``~`` expanded, and what is there."""

    path: Path
    kind: Kind  # "other": a device, socket or pipe; "missing": nothing (or a dangling link)


def shown(value: str, limit: int = 120) -> str:
    """``value`` for a message: as written, or its start and end around "..." when it is long."""
    if len(value) <= limit:
        return value
    return f"{value[: limit * 2 // 3]}...{value[-(limit // 3) :]} ({len(value)} characters)"


def expand(field: str, value: str) -> str:
    """``value`` with ``~`` / ``~user`` expanded (else as written), or a :class:`PathProblem` saying why not."""
    if "\x00" in value:
        raise PathProblem(f"{field}: {shown(value)} contains a NUL character; remove it")
    if not value.startswith("~"):
        return value
    expanded = os.path.expanduser(value)
    if expanded != value:
        return expanded
    user = value[1:].split("/", 1)[0]  # os.path.expanduser leaves what it cannot expand as it is
    if user:
        raise PathProblem(
            f"{field}: {shown(value)} starts with ~{shown(user, 40)}, but this machine has no user "
            f"{shown(user, 40)!r} whose home directory it could name; write the path out in full"
        )
    raise PathProblem(
        f"{field}: {shown(value)} starts with ~, but this process has no home directory (HOME is unset); "
        "write the path out in full or set HOME"
    )


def _os_problem(field: str, value: str, error: OSError, fix: str) -> str:
    """The message for an OS error other than "there is nothing there"."""
    code = error.errno
    if code == errno.ENAMETOOLONG:
        longest = max(Path(value).parts or (value,), key=lambda part: len(os.fsencode(part)))
        size = len(os.fsencode(longest))
        if size > NAME_MAX:
            return (
                f"{field}: {shown(value)} has a path component of {size} bytes ({shown(longest, 40)}), more than "
                f"the {NAME_MAX} a file name may have; shorten it"
            )
        return f"{field}: {shown(value)} is longer than this system allows a path to be; shorten it"
    if code in (errno.EACCES, errno.EPERM):
        return (
            f"{field}: permission denied while looking up {shown(value)}; fix the permissions of its "
            "directories or choose a path this user may read"
        )
    if code == errno.ELOOP:
        return f"{field}: {shown(value)} goes round a loop of symbolic links; fix the links or give the real path"
    return f"{field}: cannot look up {shown(value)} ({error.strerror or error}); {fix}"


def inspect_path(field: str, value: str, fix: str) -> PathInfo:
    """What is at spec path ``value`` of ``field``; every OS error becomes a :class:`PathProblem`.

    ``fix`` says what the field should name ("give the task's folder ..."); it ends the message for
    an empty value and for an error without a fix of its own. Nothing there at all (ENOENT, a file
    used as a directory on the way, a dangling link) is not an error here: ``kind`` is "missing"
    and the caller says what was expected.
    """
    if not value.strip():
        raise PathProblem(f"{field}: is empty; {fix}")
    path = Path(expand(field, value))
    try:
        mode = path.stat().st_mode
    except OSError as error:
        if error.errno in (errno.ENOENT, errno.ENOTDIR):
            return PathInfo(path, "missing")
        raise PathProblem(_os_problem(field, value, error, fix)) from None
    except ValueError:  # a lone surrogate (or NUL) that cannot be encoded as a file name
        raise PathProblem(
            f"{field}: {shown(value)} cannot be a file name (it is not valid Unicode text); fix the text"
        ) from None
    kind: Kind = "dir" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode) else "other"
    return PathInfo(path, kind)


def probe(value: str, kind: Kind) -> bool:
    """Whether ``value`` names a ``kind`` ("dir", "file"); False for any path that cannot be looked at."""
    try:
        return inspect_path("path", value, "").kind == kind
    except PathProblem:
        return False


def _home() -> str | None:
    try:
        return os.path.realpath(Path.home())
    except RuntimeError:
        return None


def output_dir_problems(field: str, value: str, fix: str) -> list[str]:
    """Problems of a directory the run writes into and deletes from (``run.output_dir`` and the like).

    It need not exist yet, but it may not be a file-system root or the user's home directory (the
    run keeps and prunes its checkpoints there, next to everything else), nor an existing
    non-directory, and the part of it that exists must be a directory the run can create it in.
    """
    try:
        info = inspect_path(field, value, fix)
        real = os.path.realpath(info.path)  # never raises, not even on a loop of links
        where = f"{shown(value)}" + (f" (= {shown(real)})" if real != str(info.path) else "")
        if os.path.dirname(real) == real:
            return [f"{field}: {where} is the root of the file system; {fix}"]
        if real == _home():
            return [f"{field}: {where} is the home directory; {fix}"]
        if info.kind not in ("dir", "missing"):
            return [f"{field}: {shown(value)} exists and is not a directory; {fix}"]
        return _creatable(field, value, info, fix)
    except PathProblem as problem:
        return [str(problem)]


def _creatable(field: str, value: str, info: PathInfo, fix: str) -> list[str]:
    """Whether a missing directory can be made: the nearest existing ancestor is a directory and
    nothing on the way is a symbolic link to nothing (``mkdir`` fails on both)."""
    path = Path(os.path.abspath(info.path))
    while info.kind == "missing" and path != path.parent:
        if os.path.islink(path):
            return [
                f"{field}: {shown(value)} cannot be created, {shown(str(path))} is a link to nothing; {fix}"
            ]
        path = path.parent
        info = inspect_path(field, str(path), fix)
        if info.kind not in ("dir", "missing"):
            return [
                f"{field}: {shown(value)} cannot be created, {shown(str(path))} is not a directory; {fix}"
            ]
    return []
