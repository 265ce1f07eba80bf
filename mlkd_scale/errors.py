"""Every user-facing error type, in one place: bad input ends in one of these, one line per problem
naming the field or file and the fix, never in a traceback (the launchers and ``mlkd-scale`` print
it and exit 2).

This module imports nothing (the spec, which is a leaf, and the readers of GLUE or SQuAD files
raise these without importing ``datasets`` or torch). The translation of Pydantic's errors into
:class:`SpecError` lines is in :mod:`mlkd_scale.spec.errors`.
"""

from __future__ import annotations


def one_line(text: str) -> str:
    """``text`` with line breaks and other non-printable characters escaped (``\\n``, ``\\x00``)."""
    if text.isprintable():
        return text
    return "".join(
        ch if ch.isprintable() else ch.encode("unicode_escape", "backslashreplace").decode("ascii")
        for ch in text
    )


class SpecError(Exception):
    """Everything wrong with a spec, one line per problem, each naming the field or file and the fix.

    Raised once with all problems so a user fixes the spec in one pass; never a traceback for bad input.
    """

    def __init__(self, problems: list[str] | str):
        problems = [problems] if isinstance(problems, str) else list(problems)
        # One problem is one line: user text quoted in a message (a path with a newline, a key with
        # a NUL byte) is escaped, so a line never breaks or hides what follows.
        self.problems = [one_line(str(p)) for p in problems]
        super().__init__("\n".join(self.problems))

    def __str__(self) -> str:
        return "\n".join(self.problems)


class DataError(ValueError):
    """A problem with the user's data sources, stated in one sentence with the fix."""


class SquadDataError(DataError):
    """A SQuAD file or hub split that cannot be read as it is, in one sentence with the fix."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, damaged, untrusted or does not fit this run; the message says what to do."""


class AugmentCacheError(RuntimeError):
    """A problem with an augmentation cache directory, worded for the user with the fix."""


class AugmentInputError(ValueError):
    """A problem with the input file of an augmentation, worded for the user (file, line, field)."""


class ExportError(RuntimeError):
    """A model cannot be exported or its exported form does not match it; the message says what to do."""


__all__ = [
    "AugmentCacheError",
    "AugmentInputError",
    "CheckpointError",
    "DataError",
    "ExportError",
    "SpecError",
    "SquadDataError",
    "one_line",
]
