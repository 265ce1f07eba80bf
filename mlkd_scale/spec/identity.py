"""A stable hash of what shapes a run's math, stored in checkpoints to detect a changed spec on resume."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from mlkd_scale.spec.run import RunSpec

#: Keys left out of :func:`spec_hash`: they say where outputs go, how often to log/checkpoint and where
#: to resume from, so changing them on resume is expected and must not look like a changed run.
HASH_EXCLUDE: dict[str, Any] = {"run": {"name", "output_dir"}, "checkpoint": True, "logging": True}


def spec_hash(spec: RunSpec) -> str:
    """A short, stable id of everything that shapes the training math (16 hex digits of sha256).

    Stored in checkpoints: a resumed run compares it to detect a changed spec. It is the sha256 of
    the canonical JSON dump (sorted keys, no whitespace) minus :data:`HASH_EXCLUDE`.
    """
    dump = spec.model_dump(mode="json", exclude=HASH_EXCLUDE)
    canonical = json.dumps(dump, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]
