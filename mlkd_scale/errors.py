"""User-facing error types: bad input ends in one of these, one line per problem naming the field or
file and the fix, never in a traceback (the launchers and ``mlkd-scale`` print it and exit 2).

:class:`SpecError` (the run spec) lives in the spec package, which is a leaf that imports nothing
heavy, and is re-exported here; :class:`DataError` (data files and sources) and
:class:`CheckpointError` (checkpoint folders and files) are defined here, so a reader of GLUE or
SQuAD files can raise one without importing ``datasets``, and the checkpoint modules without
importing each other.
"""

from __future__ import annotations

from mlkd_scale.spec.errors import SpecError


class DataError(ValueError):
    """A problem with the user's data sources, stated in one sentence with the fix."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, damaged, untrusted or does not fit this run; the message says what to do."""


class ExportError(RuntimeError):
    """A model cannot be exported or its exported form does not match it; the message says what to do."""


__all__ = ["CheckpointError", "DataError", "ExportError", "SpecError"]
