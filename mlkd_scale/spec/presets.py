"""The names of the loss presets, known to the spec without importing any loss code.

The spec is a leaf (no torch), yet ``losses.preset`` must be checked against the preset registry
(:mod:`mlkd_scale.losses.presets`). The built-in names are listed here; registering a preset there
(:func:`mlkd_scale.losses.presets.register_preset`) adds its name here too, so a preset defined in
another module (a test, a plug-in) is accepted by the spec once its module is imported.
"""

from __future__ import annotations

#: The presets shipped with the package; each is one module of ``mlkd_scale/losses/presets/``.
BUILTIN_PRESETS: tuple[str, ...] = ("mlkd", "tinybert", "minilmv2", "distilbert")

_known: dict[str, None] = dict.fromkeys(BUILTIN_PRESETS)


def known_presets() -> list[str]:
    """Every preset name the spec accepts, sorted."""
    return sorted(_known)


def add_preset_name(name: str) -> None:
    """Make ``name`` a valid ``losses.preset`` (called by the registry when a preset registers)."""
    _known[name] = None


def check_preset_name(name: str) -> str:
    """``name`` if a preset of that name exists, else a ValueError listing the known ones."""
    if name not in _known:
        raise ValueError(f"unknown preset {name!r}; the known presets are: {', '.join(known_presets())}")
    return name
