"""The base of every spec section: unknown keys refused, numbers checked before Pydantic coerces them."""

from __future__ import annotations

import types
import typing
from typing import Any, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    ValidationInfo,
    field_validator,
)

#: Largest integer a spec accepts anywhere (int64: what torch, numpy and DeepSpeed can hold).
MAX_INT = 2**63 - 1


def _wants_number(annotation: Any) -> bool:
    """Whether a field (or container element) annotation is a number and not a bool."""
    if annotation in (int, float):
        return True
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return bool(args) and all(isinstance(a, int) and not isinstance(a, bool) for a in args)
    if origin in (Union, types.UnionType):
        return bool not in args and any(_wants_number(a) for a in args)
    return False


def _number_problem(annotation: Any, value: Any) -> str | None:
    """A boolean where a number belongs (Pydantic would read ``true`` as 1), or an int beyond int64."""
    if isinstance(value, bool):
        return "expected a number, got a boolean; write the number" if _wants_number(annotation) else None
    if isinstance(value, int):
        if abs(value) > MAX_INT and _wants_number(annotation):
            return f"a number with {len(str(abs(value)))} digits is too large; numbers must fit in 64 bits"
        return None
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        for member in args:
            problem = _number_problem(member, value)
            if problem:
                return problem
        return None
    if origin in (list, tuple) and isinstance(value, (list, tuple)) and args:
        elements = args[:1] * len(value) if origin is list or args[-1] is Ellipsis else args
        for member, item in zip(elements, value):
            problem = _number_problem(member, item)
            if problem:
                return problem
    if origin is dict and isinstance(value, dict) and len(args) == 2:
        for item in value.values():
            problem = _number_problem(args[1], item)
            if problem:
                return problem
    return None


class StrictModel(BaseModel):
    """Base for every spec section: unknown keys are errors, values are re-validated on assignment.

    Numbers must be finite (NaN and infinities are refused), a boolean is never read as a number
    (``micro_batch_size: true`` would otherwise silently be 1), and integers must fit in 64 bits.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _plain_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None or isinstance(value, (str, float)):  # the common case, kept cheap
            return value
        field = cls.model_fields.get(info.field_name) if info.field_name else None
        problem = _number_problem(field.annotation, value) if field is not None else None
        if problem:
            raise ValueError(problem)
        return value
