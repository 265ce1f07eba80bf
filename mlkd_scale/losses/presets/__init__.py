"""The loss presets: one module per preset, each registered by name (the single source of names).

``PRESETS`` maps a name to its :class:`~mlkd_scale.losses.presets.base.Preset` class. Adding a
preset is one new module that defines a ``Preset`` subclass decorated with :func:`register_preset`
(and its test); once the module is imported, ``losses.preset`` accepts its name.
"""

from mlkd_scale.losses.presets import distilbert, minilmv2, mlkd, tinybert  # noqa: F401 - registers them
from mlkd_scale.losses.presets.base import (
    PRESETS,
    Preset,
    PresetSetup,
    TermInputs,
    get_preset,
    register_preset,
)

__all__ = ["PRESETS", "Preset", "PresetSetup", "TermInputs", "get_preset", "register_preset"]
