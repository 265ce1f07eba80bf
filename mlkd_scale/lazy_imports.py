"""Optional packages that DeepSpeed imports eagerly but this project needs only on demand.

DeepSpeed's autotuner (imported by ``import deepspeed``) does ``import mlflow`` whenever MLflow is
installed, and importing MLflow takes about 3 s: with the ``mlflow`` extra installed, every rank and
every subprocess would pay it even with MLflow not in ``logging.report_to``. :func:`defer_import`
registers such a package as a stand-in module: the ``import`` statement binds it at no cost and the
package really loads on its first attribute or submodule access, which only
:mod:`mlkd_scale.engine.trackers.mlflow_tracker` makes. (``importlib.util.LazyLoader`` does not do:
torch's ``inspect.getmodule`` scans of ``sys.modules`` read ``__file__``, which loads a lazy module.)
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

DEFERRED = ("mlflow",)


class _DeferredModule(types.ModuleType):
    """Stands in ``sys.modules`` for a package not imported yet; the first attribute it lacks
    (anything but the ``__file__``/``__spec__`` that module scans such as ``inspect.getmodule`` read)
    imports the real package, which then replaces it in ``sys.modules``."""

    def __getattr__(self, attr: str):
        name = self.__name__
        if sys.modules.get(name) is self:
            del sys.modules[name]
        return getattr(importlib.import_module(name), attr)


def defer_import(name: str) -> None:
    """Make ``import name`` cheap in this process (a no-op when it is absent or already imported)."""
    if name in sys.modules:
        return
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return
    if spec is None or spec.origin is None:
        return
    stub = _DeferredModule(name)
    stub.__spec__, stub.__loader__, stub.__file__ = spec, spec.loader, spec.origin
    sys.modules[name] = stub


def defer_optional_imports() -> None:
    """Apply :func:`defer_import` to every package of :data:`DEFERRED` (called by ``mlkd_scale``)."""
    for name in DEFERRED:
        defer_import(name)
