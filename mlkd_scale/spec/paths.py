"""Files and directories a run needs, checked before any rank starts.

Every check looks at the file system through :func:`~mlkd_scale.spec.fs.inspect_path` (or
:func:`~mlkd_scale.spec.fs.output_dir_problems`, or the bounded listing of
:mod:`~mlkd_scale.spec.listing` for data sources), so no path a user can write ends in a traceback.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from mlkd_scale.spec.fs import Kind, PathProblem, expand, inspect_path, output_dir_problems, probe, shown
from mlkd_scale.spec.listing import list_source_files
from mlkd_scale.spec.run import RunSpec
from mlkd_scale.spec.sections import (
    CheckpointSpec,
    DataSpec,
    DeepSpeedSpec,
    LoggingSpec,
    RunInfo,
    SourceSpec,
    StudentSpec,
    TeacherSpec,
)
from mlkd_scale.spec.task import TaskSpec

#: The repository's DeepSpeed config directory; a relative ``deepspeed.config`` is also looked up here.
DS_CONFIG_DIR = Path(__file__).resolve().parents[2] / "ds_configs"

_NOUNS = {"dir": "directory", "file": "file"}
#: A Hugging Face hub repo id, as huggingface_hub's validate_repo_id has it: [owner/]name.
_HUB_ID = re.compile(r"^(\b[\w\-.]+\b/)?\b[\w\-.]{1,96}\b$")


def existing_problems(field: str, value: str, want: Kind, fix: str) -> list[str]:
    """Problems of a spec path that must name an existing directory or file (``want``)."""
    try:
        kind = inspect_path(field, value, fix).kind
    except PathProblem as problem:
        return [str(problem)]
    if kind == want:
        return []
    if kind == "missing":
        return [f"{field}: {_NOUNS[want]} {shown(value)} does not exist; {fix}"]
    return [f"{field}: {shown(value)} is not a {_NOUNS[want]}; {fix}"]


def looks_local(name: str) -> bool:
    """Whether a model name means a local directory rather than a hub repo id.

    ``./x``, ``/x``, ``~/x``, an existing directory, or more than one ``/`` (hub ids are ``owner/name``).
    """
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or probe(name, "dir")


def find_deepspeed_config(name: str) -> Path | None:
    """Where a ``deepspeed.config`` path points: as given, else inside the repo's ``ds_configs/``."""
    if not name or not name.strip():
        return None
    if probe(name, "file"):
        return Path(expand("deepspeed.config", name))
    if not Path(name).is_absolute() and not name.startswith("~"):
        for candidate in (DS_CONFIG_DIR / name, DS_CONFIG_DIR / Path(name).name):
            if probe(str(candidate), "file"):
                return candidate
    return None


def _model_dir_problems(field: str, name: str) -> list[str]:
    fix = "give a local Hugging Face model directory or a hub name such as 'bert-base-uncased'"
    if not name.strip():
        return [f"{field}: is empty; give a local Hugging Face model directory or a hub name"]
    if not looks_local(name):
        if _HUB_ID.match(name) and "--" not in name and ".." not in name:
            return []
        return [
            (
                f"{field}: {shown(name)} is neither a local directory nor a hub model name (owner/name of "
                f"letters, digits, '-', '_' and '.', at most 96 characters each, no '--' or '..'); {fix}"
            )
        ]
    problems = existing_problems(field, name, "dir", fix)
    if problems:
        return problems
    config = str(Path(expand(field, name)) / "config.json")
    if not probe(config, "file"):
        return [
            (
                f"{field}: {shown(name)} has no config.json; point it at a Hugging Face model directory "
                "(as written by save_pretrained)"
            )
        ]
    return []


def _source_problems(index: int, source: SourceSpec) -> list[str]:
    if source.path is None:
        return []
    try:
        list_source_files(f"data.sources.{index}.path", source.path, source.format)
    except PathProblem as problem:
        return [str(problem)]
    return []


def _task_path_problems(task: TaskSpec) -> list[str]:
    problems = []
    if task.is_squad:
        for field in ("train_file", "dev_file"):
            path = getattr(task.squad, field)
            if path is not None:
                problems += existing_problems(
                    f"task.squad.{field}", path, "file", "give an official-format SQuAD JSON"
                )
        data_dir_fix = (
            "give the folder of the official SQuAD JSON files or leave it unset to read the hub copy"
        )
    else:
        data_dir_fix = (
            "give the task's folder in the original GLUE layout "
            f"(e.g. glue_data/{task.name}) or leave it unset to read the hub copy"
        )
    if task.data_dir is not None:
        problems += existing_problems("task.data_dir", task.data_dir, "dir", data_dir_fix)
    if task.augmented_dir is not None and not task.is_squad:
        problems += existing_problems(
            "task.augmented_dir",
            task.augmented_dir,
            "dir",
            "give the --out directory of a finished launchers/augment.py run or leave it unset",
        )
    return problems


def _deepspeed_path_problems(ds: DeepSpeedSpec) -> list[str]:
    if not isinstance(ds.config, str):
        return []
    fix = "give a DeepSpeed JSON file (e.g. zero2.json) or leave it unset"
    try:
        inspect_path("deepspeed.config", ds.config, fix)
    except PathProblem as problem:
        return [str(problem)]
    if find_deepspeed_config(ds.config) is None:
        return [
            (
                f"deepspeed.config: file {shown(ds.config)} not found (looked at {shown(ds.config)} and in "
                f"{DS_CONFIG_DIR}); give an existing DeepSpeed JSON file, e.g. ds_configs/zero2.json"
            )
        ]
    return []


def _resume_problems(ckpt: CheckpointSpec) -> list[str]:
    if ckpt.resume in ("auto", "never"):
        return []
    fix = "use 'auto', 'never' or an existing checkpoint tag directory"
    return existing_problems("checkpoint.resume", ckpt.resume, "dir", fix)


def _output_problems(sections: dict[str, Any]) -> list[str]:
    """The directories the run writes into: the output folder and the overrides of its parts."""
    problems = []
    if "run" in sections:
        problems += output_dir_problems(
            "run.output_dir",
            sections["run"].output_dir,
            "give a folder of the run's own, e.g. outputs/<run name> (the default)",
        )
    for section, key, part in (
        ("checkpoint", "dir", "checkpoints"),
        ("logging", "tensorboard_dir", "tensorboard"),
    ):
        value = getattr(sections.get(section), key, None)
        if value is not None:
            problems += output_dir_problems(
                f"{section}.{key}",
                value,
                f"give a folder of its own or leave it unset (= <run.output_dir>/{part})",
            )
    return problems


def _data_problems(data: DataSpec | None, sources: list[tuple[int, SourceSpec]]) -> list[str]:
    problems = [p for index, source in sources for p in _source_problems(index, source)]
    if data is not None and data.pretokenized_dir is not None:  # `mlkd-scale pretokenize` writes it
        fix = "give the --out directory of `mlkd-scale pretokenize` (a folder of its own) or leave it unset"
        problems += output_dir_problems("data.pretokenized_dir", data.pretokenized_dir, fix)
    return problems


def _problems(sections: dict[str, Any], sources: list[tuple[int, SourceSpec]]) -> list[str]:
    """Path problems of the sections present in ``sections`` (a section may be missing or None)."""
    problems: list[str] = []
    if sections.get("teacher") is not None:
        problems += _model_dir_problems("teacher.path", sections["teacher"].path)
    if sections.get("student") is not None and sections["student"].path:
        problems += _model_dir_problems("student.path", sections["student"].path)
    problems += _data_problems(sections.get("data"), sources)
    if sections.get("task") is not None:
        problems += _task_path_problems(sections["task"])
    if sections.get("deepspeed") is not None:
        problems += _deepspeed_path_problems(sections["deepspeed"])
    if sections.get("checkpoint") is not None:
        problems += _resume_problems(sections["checkpoint"])
    return problems + _output_problems(sections)


_SECTIONS: dict[str, type[BaseModel]] = {
    "run": RunInfo,
    "teacher": TeacherSpec,
    "student": StudentSpec,
    "data": DataSpec,
    "task": TaskSpec,
    "deepspeed": DeepSpeedSpec,
    "checkpoint": CheckpointSpec,
    "logging": LoggingSpec,
}


def _section_path_problems(data: dict) -> list[str]:
    """check_paths for a spec that failed validation: each section that validates alone is checked.

    A data section that fails as a whole still has each of its sources checked on its own.
    """
    parsed: dict[str, Any] = {}
    for key, model in _SECTIONS.items():
        raw = data.get(key, {} if key == "run" else None)  # run has defaults for everything
        if isinstance(raw, dict):
            try:
                parsed[key] = model.model_validate(raw)
            except ValidationError:
                pass
    if "data" in parsed:
        sources = list(enumerate(parsed["data"].sources))
    else:
        raw_data = data.get("data")
        raw_sources = raw_data.get("sources") if isinstance(raw_data, dict) else None
        sources = []
        for index, raw in enumerate(raw_sources if isinstance(raw_sources, list) else []):
            try:
                sources.append((index, SourceSpec.model_validate(raw)))
            except ValidationError:
                pass
    return _problems(parsed, sources)


def check_paths(spec: RunSpec) -> list[str]:
    """Problems with files the run needs before it starts (data, teacher/student dirs, DeepSpeed file,
    task files, a resume tag) and with the directories it writes (output, checkpoint, TensorBoard).

    Checked up front so a cluster job does not fail minutes in, after the launcher started every rank.
    Hub names are not checked (that would need the network).
    """
    sources = list(enumerate(spec.data.sources)) if spec.data is not None else []
    return _problems({key: getattr(spec, key) for key in _SECTIONS}, sources)
