"""The translation of Pydantic errors into :class:`~mlkd_scale.errors.SpecError` lines, one per problem, named by field path."""

from __future__ import annotations

import difflib
import json
import re
import types
import typing
from typing import Any, Union

from pydantic import (
    BaseModel,
    ValidationError,
)

from mlkd_scale.errors import SpecError, one_line
from mlkd_scale.spec.run import RunSpec

__all__ = ["SpecError", "format_validation_error", "one_line"]


_PLAIN_KEY = re.compile(r"^[\w\-]+$")


def _key_text(key: Any) -> str:
    """A key as a part of a dotted path: as is when plain, else quoted (``run."my key"``, ``""``)."""
    key = str(key)
    return key if _PLAIN_KEY.match(key) else json.dumps(key, ensure_ascii=False)


_FIELD_LINE = re.compile(r"^([A-Za-z_][\w.]*): (.*)$", re.DOTALL)


def _union_members(annotation: Any) -> list[Any]:
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return [a for a in typing.get_args(annotation) if a is not type(None)]
    return [annotation]


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The spec section inside an annotation (``X``, ``X | None``, ``list[X]``), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _walk_loc(loc: tuple, is_extra: bool) -> tuple[list[str], type[BaseModel] | None, bool]:
    """Turn a Pydantic error location into a dotted path, dropping union-branch tags.

    Returns the path parts, the section model that owns the last key (for "allowed keys" hints)
    and whether a union tag was dropped (so errors of the branches can be merged into one line).
    """
    parts: list[str] = []
    model: type[BaseModel] | None = RunSpec
    owner: type[BaseModel] | None = RunSpec
    expect_tag = tagged = False
    for i, part in enumerate(loc):
        if isinstance(part, int):
            parts.append(str(part))
            continue
        if expect_tag:
            expect_tag, tagged, model = False, True, None
            continue
        if model is not None and part in model.model_fields:
            annotation = model.model_fields[part].annotation
            parts.append(part)
            owner = model
            model = _model_in(annotation)
            expect_tag = len(_union_members(annotation)) > 1
            continue
        parts.append(_key_text(part))  # an unknown key (extra_forbidden) or a dict key
        owner = model if is_extra and i == len(loc) - 1 else None
        model = None
    return parts, owner, tagged


def _short(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _describe(err: dict) -> list[tuple[str, str, bool]]:
    """(path, message, from a union branch) for one Pydantic error."""
    kind = err["type"]
    is_extra = kind == "extra_forbidden"
    parts, owner, tagged = _walk_loc(tuple(err["loc"]), is_extra)
    path = ".".join(parts)
    if kind == "value_error":
        text = str(err.get("ctx", {}).get("error", err["msg"]))
        out = []
        for line in text.splitlines() or [text]:
            m = _FIELD_LINE.match(line)
            if m:  # "field: text" from one of our validators, relative to the section
                field = m.group(1)
                full = field if not path or field.startswith(path + ".") else f"{path}.{field}"
                out.append((full, m.group(2), False))
            else:
                out.append((path, line, False))
        return out
    if is_extra:
        key = str(err["loc"][-1])
        allowed = sorted(owner.model_fields) if owner is not None else []
        close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.7)
        hint = f"did you mean '{close[0]}'? " if close else ""
        return [(path, f"unknown key; {hint}allowed keys are: {', '.join(allowed)}", False)]
    if kind == "missing":
        field = owner.model_fields.get(parts[-1]) if owner is not None and parts else None
        what = "section" if field is not None and _model_in(field.annotation) is not None else "key"
        return [(path, f"required {what} is missing; add it (see `mlkd-scale schema`)", False)]
    message = err["msg"]
    if not tagged and not isinstance(err.get("input"), dict):
        message += f" (got {_short(err.get('input'))})"
    return [(path, message, tagged)]


def format_validation_error(exc: ValidationError) -> list[str]:
    """Problems of a :class:`RunSpec` ValidationError as ``"dotted.path: message"`` lines.

    Errors of the branches of a union (``'uniform' | list[int]``) are merged into one line, since
    "Input should be 'uniform'" and "Input should be a valid list" are two halves of one mistake.
    """
    lines: list[str] = []
    unions: dict[str, tuple[int, list[str], Any]] = {}  # path -> (line index, branch messages, input)
    for err in exc.errors():
        for path, message, tagged in _describe(err):
            label = path or "(top level)"
            if not tagged:
                lines.append(f"{label}: {message}")
            elif path in unions:
                unions[path][1].append(message)
            else:
                unions[path] = (len(lines), [message], err.get("input"))
                lines.append("")
    for path, (index, messages, given) in unions.items():
        first, rest = messages[0], [m.removeprefix("Input should be ") for m in messages[1:]]
        got = "" if isinstance(given, dict) else f" (got {_short(given)})"
        lines[index] = f"{path}: {' or '.join([first, *rest])}{got}"
    return lines
