"""SQuAD's task names and files, light enough for the spec to check ``task.name`` against."""

from __future__ import annotations

import re

#: Official file names per version, in a task.data_dir.
FILES = {"squad_v1": ("train-v1.1.json", "dev-v1.1.json"), "squad_v2": ("train-v2.0.json", "dev-v2.0.json")}
HUB = {"squad_v1": "rajpurkar/squad", "squad_v2": "rajpurkar/squad_v2"}


def squad_task_name(name: str) -> str | None:
    """``squad_v1`` / ``squad_v2`` for any spelling of a SQuAD version, None for anything else.

    Case, spaces, '-', '_' and '.' are ignored; 'squad' alone is v1.1.
    """
    key = re.sub(r"[^a-z0-9]", "", str(name).lower())
    if not key.startswith("squad"):
        return None
    version = key.removeprefix("squad").removeprefix("v")
    if version in ("", "1", "11"):
        return "squad_v1"
    if version in ("2", "20"):
        return "squad_v2"
    return None
