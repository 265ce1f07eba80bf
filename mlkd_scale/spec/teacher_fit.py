"""Whether the student section fits the teacher: the rules that need the teacher's config.

Checked twice with the same function, :func:`teacher_fit_problems`: by ``load_spec`` (so
``mlkd-scale validate`` reports them) when ``teacher.path`` is a local directory whose
``config.json`` can be read, and by the engines once the teacher is loaded (a hub teacher's config
is only known then). Both raise one :class:`~mlkd_scale.spec.SpecError` line per problem.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlkd_scale.spec.fs import PathProblem, expand, probe
from mlkd_scale.spec.paths import looks_local
from mlkd_scale.spec.run import RunSpec
from mlkd_scale.spec.sections import StudentSpec


def every_other_layers(num_student_layers: int, num_teacher_layers: int) -> list[int]:
    """DistilBERT's initialisation layers: every other teacher layer, counted from both ends (1-based).

    huggingface transformers ``examples/research_projects/distillation/scripts/extract_distilbert.py``
    initialises the 6 layers of DistilBERT from BERT-base's layers ``[0, 2, 4, 7, 9, 11]`` (0-based):
    every other layer from the bottom for the lower half and from the top for the upper half, so the
    first and the last teacher layer are both kept. For N of M layers: the lower ``floor(N/2)`` student
    layers take teacher layers ``2k - 1`` (k = 1, 2, ...), the upper ``ceil(N/2)`` take
    ``M, M - 2, ...`` from the top; 6 of 12 gives 1, 3, 5, 8, 10, 12, exactly the published choice.
    Needs ``2N <= M + 1`` (else two picked layers would be neighbours).
    """
    n, m = num_student_layers, num_teacher_layers
    if 2 * n > m + 1:
        raise ValueError(
            f"student.init_layers: 'every_other' needs a teacher with at least 2N - 1 layers, the teacher has "
            f"{m} for {n} student layers; give an explicit list of {n} teacher layers or 'mapping'"
        )
    lower, upper = n // 2, n - n // 2
    return [2 * k - 1 for k in range(1, lower + 1)] + [m - 2 * (upper - k) for k in range(1, upper + 1)]


def init_layer_choice(student: StudentSpec, preset: str) -> str | list[int]:
    """``student.init_layers`` with its default filled in: 'every_other' for distilbert, else 'mapping'."""
    if student.init_layers is not None:
        return student.init_layers
    return "every_other" if preset == "distilbert" else "mapping"


def width_problem(
    hidden_size: int, intermediate_size: int, teacher: Mapping[str, Any], where: str
) -> str | None:
    """The problem of copying teacher weights into a student of another width or FFN size, if any."""
    t_sizes = (teacher.get("hidden_size"), teacher.get("intermediate_size"))
    s_sizes = (hidden_size, intermediate_size)
    if None in t_sizes or t_sizes == s_sizes:
        return None
    return (
        f"student.init: 'teacher_layers' needs the teacher's width and FFN size ({where}: hidden_size "
        f"{t_sizes[0]}, intermediate_size {t_sizes[1]}), the student has hidden_size {s_sizes[0]}, "
        f"intermediate_size {s_sizes[1]}; set them to the teacher's or use init 'random'"
    )


def teacher_fit_problems(spec: RunSpec, teacher: Mapping[str, Any], where: str) -> list[str]:
    """Problems of ``spec.student`` against the teacher's config ``teacher`` (a ``config.json`` dict).

    ``where`` names the teacher in the messages (its path). Keys the config lacks are not checked.
    """
    student = spec.student
    if student.init != "teacher_layers":
        return []
    problems = [
        p for p in [width_problem(student.hidden_size, student.intermediate_size, teacher, where)] if p
    ]
    depth = teacher.get("num_hidden_layers")
    choice = init_layer_choice(student, spec.losses.preset)
    if not isinstance(depth, int):
        return problems
    if choice == "every_other":
        try:
            every_other_layers(student.num_layers, depth)
        except ValueError as error:
            problems.append(str(error))
    elif isinstance(choice, list):
        bad = [layer for layer in choice if layer > depth]
        if bad:
            problems.append(
                f"student.init_layers: entries {bad} are outside the teacher's layers 1..{depth} ({where})"
            )
    return problems


def local_teacher_problems(spec: RunSpec) -> list[str]:
    """:func:`teacher_fit_problems` for a local teacher directory whose ``config.json`` is readable.

    Nothing for a hub name or an unreadable config (the engine checks those once it has the teacher).
    """
    path = spec.teacher.path
    try:
        config_file = Path(expand("teacher.path", path)) / "config.json"
    except PathProblem:  # reported by the paths check
        return []
    if not looks_local(path) or not probe(str(config_file), "file"):
        return []
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return teacher_fit_problems(spec, config, f"teacher.path {path}") if isinstance(config, dict) else []
