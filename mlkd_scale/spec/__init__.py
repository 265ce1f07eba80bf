"""The run spec: every knob of a distillation run, validated by Pydantic v2.

Each UNKNOWN of the MLKD-BERT paper (see ``shared/paper/mlkd-bert-method.md`` §9) is a field here
with the documented default, so a user can switch readings without code changes.
Unknown keys are rejected everywhere (``extra="forbid"``).

The spec is the single source of truth of a run: batch sizes, learning rate, precision and ZeRO
stage live here, and the DeepSpeed JSON is filled from it (see :mod:`mlkd_scale.spec.plan`). Bad input
never surfaces as a traceback: :func:`load_spec` gathers every problem (types, unknown keys,
cross-field rules, files that must exist) into one :class:`SpecError`, so a user fixes a spec in
one pass.

Validator messages follow one convention so :class:`SpecError` can name the dotted field path:
a message line ``"field: text"`` is reported under ``<section path>.field``, any other line under
the section itself.

Modules: :mod:`~mlkd_scale.spec.fields` (``StrictModel``), :mod:`~mlkd_scale.spec.sections` (general
distillation's sections), :mod:`~mlkd_scale.spec.losses` (``LossesSpec``), :mod:`~mlkd_scale.spec.presets`
(the preset names, kept light), :mod:`~mlkd_scale.spec.task` (the ``task`` section), :mod:`~mlkd_scale.spec.run`
(``RunSpec``), :mod:`~mlkd_scale.spec.errors` (Pydantic errors as ``SpecError`` lines),
:mod:`~mlkd_scale.spec.reading` (a spec file, safely), :mod:`~mlkd_scale.spec.loading` (``load_spec``),
:mod:`~mlkd_scale.spec.plan` (the resolved plan and DeepSpeed config), :mod:`~mlkd_scale.spec.paths` (files a run needs, looked at through
:mod:`~mlkd_scale.spec.fs` and listed by :mod:`~mlkd_scale.spec.listing`), :mod:`~mlkd_scale.spec.identity`
(``spec_hash``). Everything is importable from ``mlkd_scale.spec``.
"""

from __future__ import annotations

from mlkd_scale.spec.errors import SpecError, format_validation_error, one_line
from mlkd_scale.spec.fields import MAX_INT, StrictModel
from mlkd_scale.spec.identity import HASH_EXCLUDE, spec_hash
from mlkd_scale.spec.loading import load_spec
from mlkd_scale.spec.paths import DS_CONFIG_DIR, check_paths, find_deepspeed_config, looks_local
from mlkd_scale.spec.plan import Plan, resolve_plan
from mlkd_scale.spec.reading import MAX_DEPTH, MAX_SPEC_BYTES, MAX_VALUES, read_mapping, structure_problems
from mlkd_scale.spec.run import RunSpec
from mlkd_scale.spec.sections import (
    CheckpointSpec,
    DataSpec,
    DeepSpeedSpec,
    FaultsSpec,
    LoggingSpec,
    LossesSpec,
    RunInfo,
    SourceSpec,
    StudentSpec,
    TeacherSpec,
    TrainSpec,
)
from mlkd_scale.spec.task import FinetuneBudget, SquadSpec, Stage1Budget, Stage2Budget, StageBudget, TaskSpec
from mlkd_scale.spec.teacher_fit import (
    every_other_layers,
    init_layer_choice,
    model_fit_problems,
    teacher_fit_problems,
    width_problem,
)

__all__ = [
    "DS_CONFIG_DIR",
    "HASH_EXCLUDE",
    "MAX_DEPTH",
    "MAX_INT",
    "MAX_SPEC_BYTES",
    "MAX_VALUES",
    "CheckpointSpec",
    "DataSpec",
    "DeepSpeedSpec",
    "FaultsSpec",
    "FinetuneBudget",
    "LoggingSpec",
    "LossesSpec",
    "Plan",
    "RunInfo",
    "RunSpec",
    "SourceSpec",
    "SpecError",
    "SquadSpec",
    "Stage1Budget",
    "Stage2Budget",
    "StageBudget",
    "StrictModel",
    "StudentSpec",
    "TaskSpec",
    "TeacherSpec",
    "TrainSpec",
    "check_paths",
    "every_other_layers",
    "find_deepspeed_config",
    "format_validation_error",
    "init_layer_choice",
    "load_spec",
    "looks_local",
    "model_fit_problems",
    "one_line",
    "read_mapping",
    "resolve_plan",
    "spec_hash",
    "structure_problems",
    "teacher_fit_problems",
    "width_problem",
]

