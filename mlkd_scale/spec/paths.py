"""Files and directories a run needs, checked before any rank starts."""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Any

from pydantic import (
    ValidationError,
)

from mlkd_scale.spec.run import RunSpec
from mlkd_scale.spec.sections import CheckpointSpec, DeepSpeedSpec, SourceSpec, StudentSpec, TeacherSpec
from mlkd_scale.spec.task import TaskSpec

#: The repository's DeepSpeed config directory; a relative ``deepspeed.config`` is also looked up here.
DS_CONFIG_DIR = Path(__file__).resolve().parents[2] / "ds_configs"




def _expand(name: str) -> Path:
    """``Path(name).expanduser()``, or the path as written when the home directory is unknown (``~nobody``)."""
    try:
        return Path(name).expanduser()
    except RuntimeError:
        return Path(name)


def _probe(path: Path, test: str) -> bool:
    """``path.is_dir()`` / ``is_file()`` / ``exists()``, False where the OS cannot even look.

    pathlib raises for a name too long, a permission denied on the way, a NUL byte or a lone
    surrogate; for a spec check those all mean "not usable", which the caller reports.
    """
    try:
        return getattr(path, test)()
    except (OSError, ValueError):
        return False


def looks_local(name: str) -> bool:
    """Whether a model name means a local directory rather than a hub repo id.

    ``./x``, ``/x``, ``~/x``, an existing directory, or more than one ``/`` (hub ids are ``owner/name``).
    """
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or _probe(_expand(name), "is_dir")


def find_deepspeed_config(name: str) -> Path | None:
    """Where a ``deepspeed.config`` path points: as given, else inside the repo's ``ds_configs/``."""
    if not name:
        return None
    given = _expand(name)
    if _probe(given, "is_file"):
        return given
    if not given.is_absolute():
        for candidate in (DS_CONFIG_DIR / given, DS_CONFIG_DIR / given.name):
            if _probe(candidate, "is_file"):
                return candidate
    return None


def _model_dir_problems(field: str, name: str) -> list[str]:
    if not name.strip():
        return [f"{field}: is empty; give a local Hugging Face model directory or a hub name"]
    if not looks_local(name):
        return []
    directory = _expand(name)
    if not _probe(directory, "is_dir"):
        return [
            (
                f"{field}: directory {name} does not exist; give a local Hugging Face model directory or a "
                "hub name such as 'bert-base-uncased'"
            )
        ]
    if not _probe(directory / "config.json", "is_file"):
        return [
            (
                f"{field}: {name} has no config.json; point it at a Hugging Face model directory "
                "(as written by save_pretrained)"
            )
        ]
    return []


def _source_problems(index: int, source: SourceSpec) -> list[str]:
    if source.path is None:
        return []
    field = f"data.sources.{index}.path"
    if not source.path.strip():
        return [f"{field}: is empty; give an existing file, directory or glob"]
    pattern = str(_expand(source.path))
    if glob.has_magic(pattern):
        try:
            found = any(_probe(Path(p), "is_file") for p in glob.iglob(pattern, recursive=True))
        except (OSError, ValueError):  # a NUL byte or a lone surrogate in the pattern
            found = False
        if not found:
            return [f"{field}: glob {source.path} matches no files; fix the pattern or the directory"]
        return []
    if not _probe(Path(pattern), "exists"):
        return [f"{field}: {source.path} does not exist; give an existing file, directory or glob"]
    return []


def _section_path_problems(data: dict) -> list[str]:
    """check_paths for a spec that failed validation: each section that validates alone is checked."""
    problems: list[str] = []
    sections = {
        "teacher": TeacherSpec,
        "student": StudentSpec,
        "deepspeed": DeepSpeedSpec,
        "checkpoint": CheckpointSpec,
    }
    parsed: dict[str, Any] = {}
    for key, model in sections.items():
        raw = data.get(key)
        if isinstance(raw, dict):
            try:
                parsed[key] = model.model_validate(raw)
            except ValidationError:
                pass
    if "teacher" in parsed:
        problems += _model_dir_problems("teacher.path", parsed["teacher"].path)
    if "student" in parsed and parsed["student"].path:
        problems += _model_dir_problems("student.path", parsed["student"].path)
    raw_sources = data.get("data", {}).get("sources") if isinstance(data.get("data"), dict) else None
    for i, raw in enumerate(raw_sources if isinstance(raw_sources, list) else []):
        try:
            problems += _source_problems(i, SourceSpec.model_validate(raw))
        except ValidationError:
            pass
    if isinstance(data.get("task"), dict):
        try:
            problems += _task_path_problems(TaskSpec.model_validate(data["task"]))
        except ValidationError:
            pass
    if "deepspeed" in parsed:
        problems += _deepspeed_path_problems(parsed["deepspeed"])
    if "checkpoint" in parsed:
        problems += _resume_problems(parsed["checkpoint"])
    return problems


def _task_path_problems(task: TaskSpec) -> list[str]:
    problems = []
    if task.is_squad:
        for field in ("train_file", "dev_file"):
            path = getattr(task.squad, field)
            if path is not None and not Path(path).expanduser().is_file():
                problems.append(f"task.squad.{field}: file {path} does not exist; give an official-format SQuAD JSON")
        if task.data_dir is not None and not Path(task.data_dir).expanduser().is_dir():
            problems.append(
                f"task.data_dir: directory {task.data_dir} does not exist; give the folder of the official "
                "SQuAD JSON files or leave it unset to read the hub copy"
            )
        return problems
    if task.data_dir is not None and not Path(task.data_dir).expanduser().is_dir():
        problems.append(
            f"task.data_dir: directory {task.data_dir} does not exist; give the task's folder in the original "
            f"GLUE layout (e.g. glue_data/{task.name}) or leave it unset to read the hub copy"
        )
    if task.augmented_dir is not None and not Path(task.augmented_dir).expanduser().is_dir():
        problems.append(
            f"task.augmented_dir: directory {task.augmented_dir} does not exist; give the --out directory of a "
            "finished launchers/augment.py run or leave it unset"
        )
    return problems


def _deepspeed_path_problems(ds: DeepSpeedSpec) -> list[str]:
    if isinstance(ds.config, str) and find_deepspeed_config(ds.config) is None:
        if not ds.config.strip():
            return [
                "deepspeed.config: is empty; give a DeepSpeed JSON file (e.g. zero2.json) or leave it unset"
            ]
        return [
            (
                f"deepspeed.config: file {ds.config} not found (looked at {ds.config} and in "
                f"{DS_CONFIG_DIR}); give an existing DeepSpeed JSON file, e.g. ds_configs/zero2.json"
            )
        ]
    return []


def _resume_problems(ckpt: CheckpointSpec) -> list[str]:
    if ckpt.resume in ("auto", "never") or (ckpt.resume.strip() and _probe(_expand(ckpt.resume), "is_dir")):
        return []
    return [
        (
            f"checkpoint.resume: {ckpt.resume} is not a directory; use 'auto', 'never' or an existing "
            "checkpoint tag directory"
        )
    ]


def check_paths(spec: RunSpec) -> list[str]:
    """Problems with files the run needs before it starts (data, teacher/student dirs, DeepSpeed file).

    Checked up front so a cluster job does not fail minutes in, after the launcher started every rank.
    Hub names are not checked (that would need the network).
    """
    problems = _model_dir_problems("teacher.path", spec.teacher.path)
    if spec.student.path:
        problems += _model_dir_problems("student.path", spec.student.path)
    for i, source in enumerate(spec.data.sources if spec.data is not None else []):
        problems += _source_problems(i, source)
    if spec.task is not None:
        problems += _task_path_problems(spec.task)
    problems += _deepspeed_path_problems(spec.deepspeed)
    problems += _resume_problems(spec.checkpoint)
    return problems
