"""Changing fields of a spec from the command line (``--set a.b.c=value``) and the shipped JSON Schema.

``--set train.lr=3e-4 --set data.sources.0.weight=2 --set run.name=ablation`` edits the parsed
spec file before it is validated, so an override is checked exactly like the file and the run
records the effective spec (its checkpoints, TensorBoard text, the spec hash). A value is parsed
as JSON where it parses (``3e-4``, ``true``, ``null``, ``[1, 2]``, ``{"path": "x"}``) and taken as
text otherwise (``run.name=ablation``); quote it as JSON to force text (``run.name='"123"'``). A
path step into a list is its index. Overrides apply in order: a field set twice takes the last value.

Editors complete and check specs from the JSON Schema shipped at :data:`SCHEMA_FILE`
(``mlkd-scale schema`` prints the same); a ``$schema`` key at the top of a JSON spec names it and is
otherwise ignored, and a YAML spec names it in its first line's
``# yaml-language-server: $schema=...`` modeline.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mlkd_scale.spec.errors import SpecError
from mlkd_scale.spec.run import RunSpec

SCHEMA_FILE = Path(__file__).with_name("run_spec.schema.json")
SCHEMA_KEY = "$schema"


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b.c=value"`` -> (``["a", "b", "c"]``, the value parsed as JSON, else the text)."""
    key, sep, raw = text.partition("=")
    steps = key.strip().split(".")
    if not sep or not all(steps):
        raise SpecError(f"--set {text!r}: give FIELD=VALUE with a dotted field, e.g. --set train.lr=3e-4")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return steps, value


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """``data`` (a parsed spec) with every ``--set`` applied in order; SpecError for a path that
    goes through something that is not a section or a list."""
    for text in overrides:
        steps, value = parse_override(text)
        node: Any = data
        for depth, step in enumerate(steps[:-1]):
            node = _child(node, step, steps[:depth], text)
        _assign(node, steps[-1], value, steps, text)
    return data


def _child(node: Any, step: str, where: list[str], text: str) -> Any:
    if isinstance(node, dict):
        return node.setdefault(step, {})
    if isinstance(node, list) and step.isdigit() and int(step) < len(node):
        return node[int(step)]
    raise SpecError(_not_a_container(node, where, text))


def _assign(node: Any, step: str, value: Any, steps: list[str], text: str) -> None:
    if isinstance(node, dict):
        node[step] = value
    elif isinstance(node, list) and step.isdigit() and int(step) <= len(node):
        node[int(step) : int(step) + 1] = [value]
    else:
        raise SpecError(_not_a_container(node, steps[:-1], text))


def _not_a_container(node: Any, where: list[str], text: str) -> str:
    field = ".".join(where)
    if isinstance(node, list):
        return f"--set {text!r}: {field} is a list of {len(node)}; the next step must be an index 0..{len(node) - 1}"
    return f"--set {text!r}: {field} holds a {type(node).__name__}, not a section, so it has no fields to set"


def drop_schema_key(data: dict, source: str) -> dict:
    """``data`` without its top-level ``$schema`` (an editor's pointer to the schema, not a setting)."""
    if SCHEMA_KEY in data:
        if not isinstance(data[SCHEMA_KEY], str):
            raise SpecError(f"{source}: {SCHEMA_KEY}: must be the schema's path or URL (a string)")
        data = {k: v for k, v in data.items() if k != SCHEMA_KEY}
    return data


def json_schema() -> dict:
    """The run spec's JSON Schema, with the ``$schema`` key a spec may carry."""
    schema = RunSpec.model_json_schema()
    schema["properties"] = {
        SCHEMA_KEY: {"type": "string", "description": "Path or URL of this schema (editors read it); ignored."},
        **schema["properties"],
    }
    return schema


def schema_text() -> str:
    """What :data:`SCHEMA_FILE` holds (and ``mlkd-scale schema`` prints)."""
    return json.dumps(json_schema(), indent=2) + "\n"
