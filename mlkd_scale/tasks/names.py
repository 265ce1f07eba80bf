"""Task names, checked by the spec without importing any task code (no torch, no ``datasets``).

:func:`canonical_task_name` gives the one spelling a run uses of any accepted spelling: SQuAD
versions (:mod:`~mlkd_scale.tasks.squad.names`) and GLUE's tasks (:mod:`~mlkd_scale.tasks.glue.table`).
"""

from __future__ import annotations

from mlkd_scale.tasks.glue.table import get_task
from mlkd_scale.tasks.squad.names import squad_task_name


def canonical_task_name(name: str) -> str:
    """``squad_v1``/``squad_v2`` or GLUE's own spelling (``SST-2``); a ValueError listing the names."""
    squad = squad_task_name(name)
    if squad is not None:
        return squad
    try:
        return get_task(name).name
    except ValueError as error:
        raise ValueError(f"{error}, or SQuAD: squad_v1, squad_v2") from None


def is_squad_name(name: str) -> bool:
    """Whether ``name`` is a spelling of a SQuAD version (the spec's squad section applies)."""
    return squad_task_name(name) is not None
