"""``load_spec``: read a spec file, apply ``--set`` overrides, validate it, check its files, its
teacher and its DeepSpeed config (and, given a world size, its batch arithmetic) in one pass."""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from mlkd_scale.spec.errors import SpecError, format_validation_error
from mlkd_scale.spec.overrides import apply_overrides, drop_schema_key
from mlkd_scale.spec.paths import _section_path_problems, check_paths
from mlkd_scale.spec.plan import check_deepspeed, plan_problems
from mlkd_scale.spec.reading import read_mapping
from mlkd_scale.spec.run import RunSpec
from mlkd_scale.spec.teacher_fit import local_teacher_problems


def load_spec(path: str | Path, world_size: int | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunSpec:
    """Read, validate and check a spec file; raise one :class:`SpecError` with every problem.

    ``overrides`` are ``--set a.b.c=value`` edits (:mod:`~mlkd_scale.spec.overrides`), applied to the
    file's contents before validation; a top-level ``$schema`` key is dropped.

    Gathers schema errors, files that must exist (:func:`check_paths`), a student that does not fit
    a local teacher's config (:func:`~mlkd_scale.spec.teacher_fit.local_teacher_problems`) and DeepSpeed-config
    conflicts. With ``world_size`` it also checks the batch arithmetic of :func:`resolve_plan`, so a
    CLI can report every problem of a spec in one pass.
    """
    data = apply_overrides(drop_schema_key(read_mapping(path), str(path)), overrides)
    try:
        spec = RunSpec.model_validate(data)
    except ValidationError as exc:
        # Still check the files of the sections that are valid on their own, so one pass finds all.
        problems = format_validation_error(exc) + _section_path_problems(data)
        raise SpecError(problems) from None
    problems = check_paths(spec) + local_teacher_problems(spec)
    if world_size is None:
        problems += check_deepspeed(spec)
    else:
        problems += plan_problems(spec, world_size)[1]
    if problems:
        raise SpecError(problems)
    return spec
