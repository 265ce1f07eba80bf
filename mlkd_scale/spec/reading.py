"""Reading a spec file (JSON or YAML) safely: unique keys, bounded size, depth and number of values."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from mlkd_scale.spec.errors import SpecError, _key_text


class _UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that refuses duplicate keys (PyYAML would silently keep the last one).

    It also stops at flow collections (``[...]``, ``{...}``) nested deeper than :data:`MAX_DEPTH`:
    PyYAML's scanner slows down quadratically with the nesting and its composer recurses, so
    ``[[[[...]]]]`` 3000 deep would take seconds before failing with a RecursionError.
    """

    def fetch_flow_collection_start(self, TokenClass: type) -> None:
        if self.flow_level >= MAX_DEPTH:
            raise yaml.scanner.ScannerError(
                None, None, f"brackets nested more than {MAX_DEPTH} levels deep", self.get_mark()
            )
        super().fetch_flow_collection_start(TokenClass)


def _construct_unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: merged keys may be overridden
            continue
        key = loader.construct_object(key_node, deep=deep)
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"a {type(key).__name__} is used as a key; keys must be strings",
                key_node.start_mark,
            ) from None
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}; keep only one", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def _json_unique(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}; keep only one")
        out[key] = value
    return out


#: Limits on what a spec file may hold: no real spec comes near them, and they keep a hostile or
#: broken file (a YAML "billion laughs", a list nested 100000 deep) from hanging or crashing a check.
MAX_SPEC_BYTES = 16 * 2**20
MAX_DEPTH = 50
MAX_VALUES = 100_000
_YAML_KINDS = {
    "date": "a date (quote it to make it text)",
    "datetime": "a timestamp (quote it to make it text)",
    "bytes": "binary data (!!binary)",
    "set": "a set (!!set; use a list)",
    "tuple": "an ordered pair (!!omap/!!pairs; use a mapping)",
}


class _TooMany(Exception):
    pass


def structure_problems(data: Any, limit: int = 20) -> list[str]:
    """Values no spec can hold, as ``"dotted.path: problem"`` lines (at most ``limit``).

    JSON and YAML can express things Pydantic and DeepSpeed cannot take: nesting deeper than
    :data:`MAX_DEPTH`, more than :data:`MAX_VALUES` values once YAML aliases are expanded, a value
    that contains itself (``&a [*a]``), keys that are not strings (``1: x``, ``null: x``), YAML-only
    values (dates, binary, sets) and strings with a NUL byte or a lone surrogate (``"\\ud800"``).
    """
    problems: list[str] = []
    open_ids: set[int] = set()
    count = 0

    def walk(value: Any, path: list[str]) -> None:
        nonlocal count
        count += 1
        if count > MAX_VALUES:
            raise _TooMany
        where = ".".join(path) or "(top level)"
        if isinstance(value, (dict, list)):
            if id(value) in open_ids:
                problems.append(
                    f"{where}: contains itself (a YAML alias inside its own anchor); write it out"
                )
                return
            if len(path) >= MAX_DEPTH:
                problems.append(
                    f"{where}: nested more than {MAX_DEPTH} levels deep; no spec setting needs that"
                )
                return
            open_ids.add(id(value))
            if isinstance(value, dict):
                for key, item in value.items():
                    if isinstance(key, str):
                        walk(item, [*path, _key_text(key)])
                    else:
                        problems.append(
                            f"{where}: key {key!r} is not a string; keys must be strings (quote it)"
                        )
            else:
                for index, item in enumerate(value):
                    walk(item, [*path, str(index)])
            open_ids.discard(id(value))
        elif isinstance(value, str):
            if "\x00" in value:
                problems.append(f"{where}: contains a NUL character; remove it")
            else:
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    problems.append(
                        f"{where}: is not valid Unicode (a lone surrogate such as \\ud800); fix the text"
                    )
        elif value is not None and not isinstance(value, (bool, int, float)):
            kind = _YAML_KINDS.get(type(value).__name__, f"a {type(value).__name__}")
            problems.append(f"{where}: holds {kind}, which a spec cannot take")

    try:
        walk(data, [])
    except _TooMany:
        problems.append(
            f"(top level): holds more than {MAX_VALUES} values (counting each use of a YAML alias); "
            "a spec is never that large"
        )
    if len(problems) > limit:
        problems = problems[:limit] + [f"(top level): and {len(problems) - limit} more problems like these"]
    return problems


def _parse(text: str, suffix: str) -> Any:
    if suffix == ".json":
        return json.loads(text, object_pairs_hook=_json_unique)
    return yaml.load(text, Loader=_UniqueKeyLoader)


def read_mapping(path: str | Path, what: str = "spec") -> dict:
    """Parse a JSON or YAML file into a dict, or raise a one-line :class:`SpecError` naming the file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".json", ".yaml", ".yml"):
        raise SpecError(f"{path}: a {what} must be a .json, .yaml or .yml file (the suffix picks the parser)")
    try:
        if path.stat().st_size > MAX_SPEC_BYTES:
            raise SpecError(
                f"{path}: the {what} file is larger than {MAX_SPEC_BYTES // 2**20} MiB; is it the right file?"
            )
        raw = path.read_bytes()
    except FileNotFoundError:
        raise SpecError(f"{path}: {what} file not found; check the path") from None
    except OSError as exc:
        raise SpecError(f"{path}: cannot read the {what} file ({exc.strerror or exc})") from None
    except ValueError as exc:  # a NUL byte in the path
        raise SpecError(f"{path}: cannot read the {what} file ({exc})") from None
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark, as some Windows editors write, is fine
    except UnicodeDecodeError as exc:
        raise SpecError(
            f"{path}: the {what} file is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
            "save it as UTF-8"
        ) from None
    try:
        data = _parse(text, suffix)
    except json.JSONDecodeError as exc:
        raise SpecError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except RecursionError:
        raise SpecError(
            f"{path}: invalid {what}: nested too deeply to read; no spec setting needs that"
        ) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = exc.problem or exc.context or str(exc).splitlines()[0]
        raise SpecError(f"{path}: invalid YAML{where}: {problem}") from None
    except yaml.reader.ReaderError as exc:
        char = f"#x{exc.character:04x}" if isinstance(exc.character, int) else repr(exc.character)
        raise SpecError(
            f"{path}: invalid YAML at character {exc.position}: {char} is not allowed in YAML text"
        ) from None
    except yaml.YAMLError as exc:
        raise SpecError(
            f"{path}: invalid YAML: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from None
    except ValueError as exc:  # a duplicate JSON key, or a number too long to convert
        kind = "JSON" if suffix == ".json" else "YAML"
        message = str(exc).split("; use sys.set_int_max_str_digits", 1)[0]
        raise SpecError(f"{path}: invalid {kind}: {message}") from None
    if not isinstance(data, dict):
        got = "an empty file" if data is None else f"a {type(data).__name__}"
        raise SpecError(f"{path}: the top level of a {what} must be a mapping of keys to values, got {got}")
    problems = structure_problems(data)
    if problems:
        raise SpecError([f"{path}: {line}" for line in problems])
    return data


