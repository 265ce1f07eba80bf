"""The task types a run can have, and the one way to open a run's task from its spec.

Adding a task type (NER, multiple choice, ...) is a new module with a class implementing
:class:`~mlkd_scale.tasks.base.Task` (and ``accepts(name)``, which says whether a canonical
``task.name`` is one of its tasks), its tests, and its line in :data:`TASK_TYPES`; for the spec to
accept its names, a light name check in :mod:`mlkd_scale.tasks.names`.
"""

from __future__ import annotations

from mlkd_scale.spec import TaskSpec
from mlkd_scale.tasks.base import Task
from mlkd_scale.tasks.glue.task import Glue
from mlkd_scale.tasks.squad.task import SquadTask

#: Every task type, asked in order whether it accepts a task name.
TASK_TYPES = (SquadTask, Glue)


def open_task(spec: TaskSpec) -> Task:
    """The :class:`~mlkd_scale.tasks.base.Task` of a spec's task section."""
    for task_type in TASK_TYPES:
        if task_type.accepts(spec.name):
            return task_type(spec)
    raise ValueError(f"task.name: no task type accepts {spec.name!r}")
