"""Property-based fuzzing of run specs: bad input is one clear SpecError, never a traceback.

Every test starts from a valid spec (a tiny teacher directory with a config.json and a small jsonl
corpus in a temporary directory) and mutates it: wrong types and out-of-range numbers at every leaf,
unknown and missing keys at every level, bad enum strings and paths, broken JSON/YAML text, DeepSpeed
config conflicts and the batch arithmetic over world sizes 1..64. The property is the same for all:
``load_spec`` and ``resolve_plan`` either succeed or raise :class:`SpecError`, and each line of the
error is non-empty, a single line, and names a field path or the file.

Path fields get paths no file system takes (an unknown ``~user``, a 300-character component, a NUL
byte, a loop of links, a device, a ``**`` glob that matches nothing, a root or the home directory as
an output folder), in general and task specs. Every spec tried is counted by outcome (accepted,
refused, and stray exceptions, which fail the test); the tally is printed at the end of the module
(and written as JSON to $FUZZ_TALLY when set).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
import re
from collections import Counter
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from mlkd_scale import cli
from mlkd_scale.spec import RunSpec, SpecError, listing, load_spec, spec_hash
from mlkd_scale.spec.plan import resolve_plan

# FUZZ_EXAMPLES=5000 runs a deeper, randomized search; by default the examples are the same on
# every run, so a CI failure reproduces locally.
_DEEP = int(os.environ.get("FUZZ_EXAMPLES", "0"))
FUZZ = settings(
    max_examples=_DEEP or 150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=not _DEEP,
    database=None,
)
SECTIONS = tuple(RunSpec.model_fields)
#: Specs tried, by outcome; printed when the module ends (see the ``tally`` fixture).
TALLY: Counter = Counter()


@pytest.fixture(scope="module", autouse=True)
def tally(request: pytest.FixtureRequest):
    """Print (and with $FUZZ_TALLY, write) how many specs the module tried and how each ended."""
    TALLY.clear()
    yield TALLY
    lines = [f"{kind}: {count}" for kind, count in sorted(TALLY.items(), key=lambda kv: (-kv[1], kv[0]))]
    plugins = request.config.pluginmanager
    reporter, capture = plugins.getplugin("terminalreporter"), plugins.getplugin("capturemanager")
    if reporter is not None:
        with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
            reporter.write_line("\nspec fuzzing: " + "; ".join(lines))
    if os.environ.get("FUZZ_TALLY"):
        Path(os.environ["FUZZ_TALLY"]).write_text(json.dumps(dict(TALLY), indent=1, sort_keys=True) + "\n")


# --------------------------------------------------------------------------------------------------
# The valid starting point
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fuzz")
    (root / "teacher").mkdir()
    (root / "teacher" / "config.json").write_text(
        json.dumps({"model_type": "bert", "num_hidden_layers": 2, "hidden_size": 64})
    )
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(5)))
    (root / "ds.json").write_text(json.dumps({"zero_optimization": {"overlap_comm": True}}))
    return root


def base_spec(root: Path) -> dict:
    """A valid spec that sets (almost) every field, so every leaf can be mutated."""
    return {
        "run": {"name": "fuzz", "output_dir": str(root / "out"), "seed": 1},
        "teacher": {"path": str(root / "teacher"), "dtype": "fp32", "placement": "replicate"},
        "student": {
            "num_layers": 2,
            "hidden_size": 64,
            "num_heads": 4,
            "intermediate_size": 128,
            "init": "random",
        },
        "losses": {
            "preset": "mlkd",
            "weights": {"emb": 1.0, "mha": 0.5},
            "layer_mapping": [1, 2],
            "mha_splits": 4,
            "mask_padding": True,
            "projection": "per_layer",
            "kd_temperature": 1.0,
            "kd_scale_by_t2": True,
            "contrastive_temperature": 0.2,
            "contrastive_projection": True,
            "regression_contrastive": "off",
            "relation_heads": 8,
            "relation_teacher_layer": 2,
        },
        "data": {
            "sources": [
                {
                    "path": str(root / "corpus.jsonl"),
                    "format": "json",
                    "split": "train",
                    "weight": 1.0,
                    "text_field": "text",
                },
                {"name": "wikimedia/wikipedia", "config": "20231101.en", "weight": 0.5},
            ],
            "max_seq_length": 64,
            "shuffle_buffer": 10,
        },
        "train": {
            "micro_batch_size": 4,
            "gradient_accumulation_steps": 2,
            "max_steps": 100,
            "lr": 1e-4,
            "warmup_steps": 5,
            "warmup_ratio": 0.1,
            "decay": "cosine",
            "min_lr_ratio": 0.1,
            "weight_decay": 0.01,
            "adam_betas": [0.9, 0.999],
            "adam_eps": 1e-6,
            "grad_clip": 1.0,
            "precision": "bf16",
            "zero_stage": 2,
        },
        "deepspeed": {"config": {"zero_optimization": {"overlap_comm": True}, "train_batch_size": "auto"}},
        "checkpoint": {
            "every_n_steps": 10,
            "keep_last": 2,
            "resume": "auto",
            "dir": str(root / "ckpt"),
            "export_at_end": False,
        },
        "logging": {
            "every_n_steps": 5,
            "tensorboard_dir": None,
            "progress_bar": False,
            "record_sample_ids": False,
        },
    }


def leaf_paths(value, prefix=()) -> list[tuple]:
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in leaf_paths(v, (*prefix, k))]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in leaf_paths(v, (*prefix, i))]
    return [prefix]


def dict_paths(value, prefix=()) -> list[tuple]:
    out = [prefix] if isinstance(value, dict) else []
    if isinstance(value, dict):
        for k, v in value.items():
            out += dict_paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += dict_paths(v, (*prefix, i))
    return out


def get_in(data, path):
    for part in path:
        data = data[part]
    return data


def set_in(data: dict, path: tuple, value) -> dict:
    data = copy.deepcopy(data)
    get_in(data, path[:-1])[path[-1]] = value
    return data


_PROBE = base_spec(Path("/probe"))
LEAVES = leaf_paths(_PROBE)
DICTS = dict_paths(_PROBE)
KEYS = [(*d, k) for d in DICTS for k in get_in(_PROBE, d)]

# --------------------------------------------------------------------------------------------------
# The property
# --------------------------------------------------------------------------------------------------


def location_ok(line: str, spec_path: Path, data) -> bool:
    """Whether a problem line starts by naming the spec file or a field path."""
    if line.startswith((str(spec_path), "(top level): ")):
        return True
    m = re.match(r"^([^\s.:]+)[.: ]", line)
    if m is None:
        return False
    first = m.group(1)
    tops = set(SECTIONS) | ({k for k in data if isinstance(k, str)} if isinstance(data, dict) else set())
    return first in tops or first.startswith('"')  # a quoted unknown key


def check_lines(exc: SpecError, spec_path: Path, data=None) -> None:
    assert exc.problems, "a SpecError without problems"
    assert str(exc) == "\n".join(exc.problems)
    for line in exc.problems:
        assert isinstance(line, str) and line.strip(), f"empty problem line in {exc.problems}"
        assert "\n" not in line and "\r" not in line, f"multi-line problem: {line!r}"
        assert location_ok(line, spec_path, data if data is not None else {}), (
            f"names no field/file: {line!r}"
        )


def check(path: Path, data=None, world_sizes=(1, 8, 64)) -> RunSpec | None:
    """load_spec / resolve_plan either succeed or raise SpecError with good lines; nothing else.

    Counts the spec in :data:`TALLY` by outcome; a stray exception is counted, then raised.
    """
    TALLY["specs tried"] += 1
    try:
        outcome, spec = _check(path, data, world_sizes)
    except Exception as exc:
        TALLY[f"stray {type(exc).__name__}"] += 1
        raise
    TALLY[outcome] += 1
    return spec


def _check(path: Path, data, world_sizes) -> tuple[str, RunSpec | None]:
    try:
        spec = load_spec(path)
    except SpecError as exc:
        check_lines(exc, path, data)
        spec = None
    try:  # with a world size, load_spec takes the resolve_plan checks into the same pass
        load_spec(path, world_size=world_sizes[-1])
    except SpecError as exc:
        check_lines(exc, path, data)
    if spec is None:
        return "refused by load_spec (SpecError)", None
    spec_hash(spec)
    outcome = "accepted, planned at every world size"
    for ws in world_sizes:
        try:
            plan = resolve_plan(spec, ws)
        except SpecError as exc:
            check_lines(exc, path, data)
            outcome = "accepted, refused by resolve_plan at a world size (SpecError)"
            continue
        plan.summary()
        json.dumps(plan.deepspeed_config, allow_nan=False)  # what DeepSpeed gets is strict JSON
    return outcome, spec


def write_json(root: Path, data) -> Path:
    path = root / "spec.json"
    path.write_text(json.dumps(data, ensure_ascii=True))
    return path


def write_yaml(root: Path, data) -> Path:
    path = root / "spec.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=False))
    return path


# --------------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------------

SPECIAL_VALUES = [
    0,
    -1,
    -(2**63),
    2**63,
    10**30,
    10**400,
    0.0,
    -0.0,
    0.5,
    1.5,
    1e-320,
    1e308,
    math.nan,
    math.inf,
    -math.inf,
    True,
    False,
    None,
    "",
    " ",
    "auto",
    "0",
    "12",
    "1e3",
    "nan",
    "inf",
    "true",
    "null",
    "uniform",
    "random",
    "bf16",
    "a\nb",
    "line\r\n",
    "\x00",
    "nul\x00byte",
    "\udc80",
    "\u202e",
    "x" * 5000,
    "~nosuchuser_fuzz/x",
    "~/no/such/dir",
    "/nonexistent/x",
    "./rel/../x",
    "*.nothing",
    "**/*.jsonl",
    "[",
    "a:b",
    [],
    {},
    [1, 2],
    [0.9, 0.999, 0.5],
    [-1, 2],
    ["a"],
    {"a": 1},
    {"enabled": True},
    [[[[[]]]]],
]
json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=20),
    st.sampled_from(SPECIAL_VALUES),
)
json_value = st.recursive(
    json_leaf,
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
    max_leaves=8,
)
weird = st.one_of(st.sampled_from(SPECIAL_VALUES), json_value)
ENUM_JUNK = ["BF16", "fp8", "Random", "mlkd ", "", "zero3 ", "LINEAR", "none", "0", "auto"]


# --------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------


def test_base_spec_is_valid(root: Path) -> None:
    spec = check(write_json(root, base_spec(root)))
    assert spec is not None and spec.student.num_heads == 4
    assert resolve_plan(spec, 2).global_batch_size == 16


@FUZZ
@given(path=st.sampled_from(LEAVES), value=weird, as_yaml=st.booleans())
def test_wrong_value_at_any_leaf(root: Path, path: tuple, value, as_yaml: bool) -> None:
    data = set_in(base_spec(root), path, value)
    try:
        spec_path = write_yaml(root, data) if as_yaml else write_json(root, data)
    except (yaml.YAMLError, UnicodeEncodeError, ValueError):
        spec_path = write_json(root, data)
    check(spec_path, data)


@FUZZ
@given(path=st.sampled_from(LEAVES), junk=st.sampled_from(ENUM_JUNK) | st.text(max_size=12))
def test_bad_strings_at_any_leaf(root: Path, path: tuple, junk: str) -> None:
    check(write_json(root, set_in(base_spec(root), path, junk)), None)


@FUZZ
@given(
    where=st.sampled_from(DICTS),
    key=st.text(min_size=0, max_size=12),
    value=json_value,
)
def test_unknown_keys_at_every_level(root: Path, where: tuple, key: str, value) -> None:
    data = base_spec(root)
    target = get_in(data, where)
    assume(key not in target)
    target[key] = value
    if where == ():
        # an unknown top-level key names itself; any key, even '', must still give a located line
        pass
    spec_path = write_json(root, data)
    spec = check(spec_path, data)
    # extra keys are refused, except inside deepspeed.config, which passes settings through
    assert (
        spec is None
        or where[:2] == ("deepspeed", "config")
        or where[:1] == ("losses",)
        and where[1:2] == ("weights",)
    )


@FUZZ
@given(keys=st.lists(st.sampled_from(KEYS), min_size=1, max_size=4, unique=True))
def test_missing_keys(root: Path, keys: list[tuple]) -> None:
    data = base_spec(root)
    for key in sorted(keys, key=len, reverse=True):
        with contextlib.suppress(KeyError, IndexError, TypeError):
            del get_in(data, key[:-1])[key[-1]]
    spec = check(write_json(root, data), data)
    if any(
        k in (("teacher",), ("data",), ("train",), ("teacher", "path"), ("data", "sources")) for k in keys
    ):
        assert spec is None


@FUZZ
@given(
    field=st.sampled_from(
        [
            ("train", "lr"),
            ("train", "adam_eps"),
            ("train", "weight_decay"),
            ("train", "grad_clip"),
            ("train", "warmup_ratio"),
            ("train", "min_lr_ratio"),
            ("losses", "kd_temperature"),
            ("losses", "contrastive_temperature"),
            ("data", "sources", 0, "weight"),
            ("losses", "weights", "emb"),
            ("train", "adam_betas", 0),
            ("train", "adam_betas", 1),
        ]
    ),
    value=st.sampled_from([math.nan, math.inf, -math.inf, -0.0, -1e-9, 1e308 * 10]),
    as_yaml=st.booleans(),
)
def test_non_finite_and_negative_floats_are_refused(
    root: Path, field: tuple, value: float, as_yaml: bool
) -> None:
    data = set_in(base_spec(root), field, value)
    spec_path = write_yaml(root, data) if as_yaml else write_json(root, data)
    spec = check(spec_path, data)
    if value != 0:  # -0.0 is a valid zero; NaN, infinities and negatives are refused everywhere
        assert spec is None, f"{field}={value} was accepted"


@FUZZ
@given(
    field=st.sampled_from(
        [
            ("train", "micro_batch_size"),
            ("train", "gradient_accumulation_steps"),
            ("train", "max_steps"),
            ("train", "warmup_steps"),
            ("train", "zero_stage"),
            ("student", "num_layers"),
            ("student", "num_heads"),
            ("student", "hidden_size"),
            ("data", "max_seq_length"),
            ("data", "shuffle_buffer"),
            ("run", "seed"),
            ("losses", "layer_mapping", 0),
            ("losses", "mha_splits"),
            ("checkpoint", "every_n_steps"),
        ]
    ),
    value=st.sampled_from([0, -1, -(10**30), 10**12 + 1, 10**30, 10**400, True, False, 2.0, 2.5, "4"]),
)
def test_integers_out_of_range_or_of_the_wrong_kind(root: Path, field: tuple, value) -> None:
    data = set_in(base_spec(root), field, value)
    spec = check(write_json(root, data), data)
    if isinstance(value, bool):
        assert spec is None, f"{field}={value} (a boolean) was accepted as a number"


# -- DeepSpeed config ------------------------------------------------------------------------------

ds_number = st.one_of(
    st.integers(-3, 300), st.floats(allow_nan=True), st.sampled_from(["auto", "16", "", None, True, [], {}])
)
ds_precision = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={"enabled": st.sampled_from([True, False, "auto", "yes", None, 1]), "loss_scale": ds_number},
    ),
    weird,
)
ds_config = st.fixed_dictionaries(
    {},
    optional={
        "train_micro_batch_size_per_gpu": ds_number,
        "gradient_accumulation_steps": ds_number,
        "train_batch_size": ds_number,
        "gradient_clipping": ds_number,
        "optimizer": st.sampled_from([{"type": "AdamW", "params": {"lr": "auto"}}, {}, "adam", None]),
        "scheduler": st.sampled_from([{"type": "WarmupLR"}, [], "auto"]),
        "bf16": ds_precision,
        "bfloat16": ds_precision,
        "fp16": ds_precision,
        "zero_optimization": st.one_of(
            st.fixed_dictionaries(
                {},
                optional={
                    "stage": st.sampled_from(
                        [0, 1, 2, 3, 4, -1, 2.0, 2.5, "2", "auto", True, None, [], math.nan]
                    ),
                    "offload_optimizer": st.one_of(st.just({"device": "cpu"}), st.just("auto"), json_value),
                    "reduce_bucket_size": st.sampled_from([5e8, "auto", math.inf, -1]),
                },
            ),
            weird,
        ),
        "steps_per_print": ds_number,
        "zero_allow_untested_optimizer": st.booleans(),
        "nested": json_value,
    },
)


@FUZZ
@given(
    cfg=ds_config,
    micro=st.integers(1, 8),
    accum=st.integers(1, 4),
    world=st.integers(1, 64),
    owned=st.sets(st.sampled_from(["precision", "zero_stage"])),
    as_file=st.booleans(),
)
def test_deepspeed_config_conflicts(root: Path, cfg, micro, accum, world, owned, as_file) -> None:
    data = base_spec(root)
    train = data["train"]
    train.update(micro_batch_size=micro, gradient_accumulation_steps=accum)
    for key in ("precision", "zero_stage"):
        if key not in owned:
            del train[key]
    if as_file:
        (root / "ds_fuzz.json").write_text(json.dumps(cfg))
        data["deepspeed"]["config"] = str(root / "ds_fuzz.json")
    else:
        data["deepspeed"]["config"] = cfg
    spec = check(write_json(root, data), data, world_sizes=(world,))
    if spec is None:
        return
    plan = resolve_plan(spec, world) if _plan_ok(spec, world) else None
    if plan is not None:
        ds = plan.deepspeed_config
        assert ds["train_batch_size"] == micro * accum * world == plan.global_batch_size
        assert ds["train_micro_batch_size_per_gpu"] == micro and ds["gradient_accumulation_steps"] == accum
        assert "optimizer" not in ds and "scheduler" not in ds
        assert (
            ds["zero_optimization"]["stage"] in (0, 1, 2, 3) and type(ds["zero_optimization"]["stage"]) is int
        )
        assert [ds["bf16"]["enabled"], ds["fp16"]["enabled"]].count(True) <= 1
        assert "auto" not in json.dumps(ds)


def _plan_ok(spec, world) -> bool:
    try:
        resolve_plan(spec, world)
    except SpecError:
        return False
    return True


@FUZZ
@given(
    micro=st.integers(1, 64),
    accum=st.integers(1, 64),
    world=st.integers(1, 64),
    global_batch=st.one_of(st.none(), st.integers(1, 64 * 64 * 64 + 1)),
    budget=st.one_of(st.none(), st.integers(1, 10**12)),
)
def test_batch_arithmetic_over_world_sizes(root: Path, micro, accum, world, global_batch, budget) -> None:
    data = base_spec(root)
    data["train"].update(micro_batch_size=micro, gradient_accumulation_steps=accum, warmup_steps=None)
    if global_batch is not None:
        data["train"]["global_batch_size"] = global_batch
    if budget is not None:
        data["train"]["token_budget"] = budget
        del data["train"]["max_steps"]
    path = write_json(root, data)
    spec = load_spec(path)  # the world size is unknown here: always valid
    TALLY["specs tried"] += 1
    try:
        plan = resolve_plan(spec, world)
    except SpecError as exc:
        TALLY["accepted, refused by resolve_plan at a world size (SpecError)"] += 1
        check_lines(exc, path, data)
        assert global_batch is not None and global_batch != micro * accum * world
        assert exc.problems[0].startswith("train.global_batch_size: ")
        with pytest.raises(SpecError):
            load_spec(path, world_size=world)
        return
    TALLY["accepted, planned at every world size"] += 1
    assert global_batch in (None, micro * accum * world)
    assert plan.global_batch_size == micro * accum * world
    assert plan.tokens_per_step == plan.global_batch_size * 64
    steps = -(-budget // plan.tokens_per_step) if budget else 100
    assert plan.total_steps == steps and plan.total_steps * plan.tokens_per_step >= (budget or 0)


# -- broken files ----------------------------------------------------------------------------------


def _corruptions(text: str) -> st.SearchStrategy[bytes]:
    raw = text.encode()
    return st.one_of(
        st.integers(0, len(raw)).map(lambda n: raw[:n]),  # truncated
        st.tuples(st.integers(0, len(raw)), st.binary(min_size=1, max_size=16)).map(
            lambda t: raw[: t[0]] + t[1] + raw[t[0] :]
        ),  # binary bytes inserted
        st.integers(0, len(raw)).map(lambda n: raw[:n] + b"\xff\xfe\xc3\x28" + raw[n:]),  # invalid UTF-8
        st.binary(max_size=64),  # pure garbage
        st.sampled_from(
            [
                b"",
                b"   \n",
                b"\xef\xbb\xbf" + raw,
                b"[]",
                b"[1, 2]",
                b"42",
                b'"a string"',
                b"null",
                b"true",
                raw.replace(b"1e-05", b"NaN"),
                raw.replace(b"1e-05", b"Infinity"),
                raw.replace(b"100", b"1" * 5000),
                b"[" * 100_000 + b"]" * 100_000,
                b"{" * 5000,
                b'{"a":' * 3000 + b"1" + b"}" * 3000,
                raw.replace(b'"fuzz"', b'"\\ud800"'),
                raw.replace(b'"fuzz"', b'"a\\u0000b"'),
                raw.replace(b'"train": {', b'"train": {"lr": 1, "lr": 2,'),
            ]
        ),
    )


@FUZZ
@given(data=st.data())
def test_broken_json_text(root: Path, data) -> None:
    text = json.dumps(base_spec(root))
    blob = data.draw(_corruptions(text))
    path = root / "broken.json"
    path.write_bytes(blob)
    check(path)


YAML_SNIPPETS = [
    "!!python/object/apply:os.system ['echo hi']",
    "!!python/name:os.system",
    "!!binary aGVsbG8=",
    "!!timestamp 2024-01-01",
    "2024-01-01",
    "!!set {a, b}",
    "!!omap [a: 1]",
    "!!float nan",
    ".inf",
    "-.inf",
    ".nan",
    "0x1F",
    "0o17",
    "1_000",
    "1:30",  # sexagesimal in YAML 1.1
    "yes",
    "off",
    "~",
    "&a [*a]",  # a list that contains itself
    "&a {x: *a}",
    "*undefined_alias",
    "!custom_tag 3",
    "!!str",
    "{? [a, b] : c}",  # a list as a mapping key
    "{1: a, 2: b}",
    "{null: a}",
    "{[1]: x}",
    "[" * 3000 + "]" * 3000,
    "'unterminated",
    "\t- tab",
    "\x00",
    "\x1b[31m",
    "a\u2028b",
]


@FUZZ
@given(path=st.sampled_from(LEAVES + [(s,) for s in SECTIONS]), snippet=st.sampled_from(YAML_SNIPPETS))
def test_yaml_tags_and_oddities_at_any_leaf(root: Path, path: tuple, snippet: str) -> None:
    marker = "__FUZZ_MARKER__"
    data = set_in(base_spec(root), path, marker)
    text = yaml.safe_dump(data).replace(f"'{marker}'", snippet).replace(marker, snippet)
    spec_path = root / "odd.yaml"
    spec_path.write_bytes(text.encode("utf-8", "surrogatepass"))
    check(spec_path)


@pytest.mark.parametrize(
    "text",
    [
        # billion laughs: each level doubles; expanding it would take exponential time and memory
        "a: &a [x, x]\n"
        + "".join(
            f"b{i}: &b{i} [*{'a' if i == 0 else f'b{i - 1}'}, *{'a' if i == 0 else f'b{i - 1}'}]\n"
            for i in range(40)
        )
        + "teacher: {path: bert-base-uncased}\n",
        "deepspeed:\n  config: &c {x: [1, 2]}\n" + "".join(f"  c{i}: *c\n" for i in range(3)),
        "deepspeed:\n  config: &c {x: *c}\n",
        "teacher: &t {path: *t}\n",
        "--- {a: 1}\n--- {b: 2}\n",  # two documents
        "%YAML 1.1\n---\nteacher: {path: x}\n",
        "%TAG ! tag:example.com,2000:\n---\n!foo {a: 1}\n",
    ],
)
def test_yaml_structures(root: Path, text: str) -> None:
    path = root / "struct.yaml"
    path.write_text(text)
    check(path)


@pytest.mark.parametrize("name", ["spec.txt", "spec", "dir.json", "missing.yaml", "spec.JSON"])
def test_bad_spec_paths(root: Path, name: str) -> None:
    path = root / name
    if name == "dir.json":
        path.mkdir(exist_ok=True)
    elif name != "missing.yaml":
        path.write_text(json.dumps(base_spec(root)))
    check(path)


def test_error_lines_escape_control_characters(root: Path) -> None:
    data = base_spec(root)
    data["bad\nkey"] = 1
    data["teacher"]["path"] = str(root / "no\nsuch\rdir")
    data["data"]["sources"][0]["path"] = "/no/such\tfile"
    data["deepspeed"]["config"] = {"train_micro_batch_size_per_gpu": "a\nb"}
    path = write_json(root, data)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    check_lines(info.value, path, data)
    text = str(info.value)
    assert '"bad\\nkey": unknown key' in text and "no\\nsuch\\rdir" in text and "such\\tfile" in text
    ds_only = set_in(base_spec(root), ("deepspeed", "config"), {"train_micro_batch_size_per_gpu": "a\nb"})
    with pytest.raises(SpecError) as info:
        load_spec(write_json(root, ds_only))
    check_lines(info.value, root / "spec.json", ds_only)
    assert "train_micro_batch_size_per_gpu=a\\nb but train.micro_batch_size is 4" in str(info.value)
    data["data"]["sources"][0]["path"] = "/no/such\x00file"  # NUL bytes are refused as the file is read
    with pytest.raises(SpecError, match=r"data\.sources\.0\.path: contains a NUL character"):
        load_spec(write_json(root, data))


def test_huge_head_count_hint_is_fast(root: Path) -> None:
    data = base_spec(root)
    data["student"].update(hidden_size=10**15 + 37, num_heads=10**15)
    data["losses"]["mha_splits"] = None
    path = write_json(root, data)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    check_lines(info.value, path, data)
    assert "student.num_heads" in str(info.value)


# -- paths -----------------------------------------------------------------------------------------

GENERAL_PATHS = [
    ("teacher", "path"),
    ("student", "path"),
    ("data", "sources", 0, "path"),
    ("data", "pretokenized_dir"),
    ("deepspeed", "config"),
    ("checkpoint", "resume"),
    ("checkpoint", "dir"),
    ("logging", "tensorboard_dir"),
    ("run", "output_dir"),
]
TASK_PATHS = [
    ("task", "data_dir"),
    ("task", "augmented_dir"),
    ("task", "squad", "train_file"),
    ("task", "squad", "dev_file"),
]
OUTPUT_DIRS = {("run", "output_dir"), ("checkpoint", "dir"), ("logging", "tensorboard_dir")}
#: Values no path field takes, whatever the field (the spec must be refused, naming the field).
ALWAYS_BAD = {
    "unknown user": "~nosuchuser_fuzz/x",
    "unknown user, bare": "~nosuchuser_fuzz",
    "unknown user glob": "~nosuchuser_fuzz/**/*.jsonl",
    "300-char component": "/tmp/" + "x" * 300 + "/y",
    "300-char relative name": "x" * 300,
    "5000-char component": "/" + "x" * 5000,
    "NUL byte": "./a\x00b",
    "lone surrogate": "/\udc80/x",
}


def odd_paths(root: Path) -> dict[str, str]:
    """Paths that some fields take and others refuse, by what they are."""
    return {
        "unmatched ** glob": f"{root}/**/*.nomatch",
        "root": "/",
        "root, through ..": f"{root}/" + "../" * 40,
        "home": "~",
        "loop of links": f"{root}/loop_a/x",
        "dangling link": f"{root}/dangling",
        "file used as a directory": f"{root}/corpus.jsonl/x",
        "a device": "/dev/null",
        "empty": "",
        "blank": "   ",
        "does not exist": f"{root}/no/such/thing",
    }


@pytest.fixture(scope="module", autouse=True)
def quick_listings():
    """Listings stop after 20,000 entries here (100,000 in a run), so a source of "/" or "~" costs the
    fuzzer a few milliseconds; tests/test_spec_paths.py covers the real bounds."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(listing, "MAX_LISTED_ENTRIES", 20_000)
        yield


@pytest.fixture(scope="module")
def odd_root(root: Path) -> Path:
    """``root`` plus a loop of symbolic links, a dangling link, a GLUE folder and a SQuAD file."""
    if not (root / "loop_a").is_symlink():
        os.symlink("loop_b", root / "loop_a")
        os.symlink("loop_a", root / "loop_b")
        os.symlink("nowhere", root / "dangling")
        (root / "glue").mkdir()
        (root / "squad.json").write_text(json.dumps({"version": "v2.0", "data": []}))
    return root


def task_base(root: Path, field: tuple) -> dict:
    """A valid task spec: SQuAD when ``field`` is a task.squad file, else RTE."""
    spec = {k: v for k, v in base_spec(root).items() if k not in ("data", "train")}
    squad = field[:2] == ("task", "squad")
    spec["task"] = {
        "name": "squad_v2" if squad else "rte",
        "data_dir": str(root / "glue"),
        "max_seq_length": 64,
    }
    if squad:
        squad_file = str(root / "squad.json")
        spec["task"]["squad"] = {
            "train_file": squad_file,
            "dev_file": squad_file,
            "doc_stride": 16,
            "max_query_length": 12,
        }
    spec["train"] = {"micro_batch_size": 4, "precision": "bf16", "zero_stage": 2}
    return spec


def with_path(root: Path, field: tuple, value: str) -> dict:
    data = task_base(root, field) if field[0] == "task" else base_spec(root)
    if field == ("student", "path"):
        data["student"]["init"] = "path"
    return set_in(data, field, value)


#: The (field, path) pairs a spec may hold: a folder the run creates, or an existing directory.
ACCEPTED = {
    *((field, kind) for field in [*OUTPUT_DIRS, ("data", "pretokenized_dir")]
      for kind in ("does not exist", "unmatched ** glob")),
    (("run", "output_dir"), "empty"),  # = outputs/<run.name>
    *((field, kind) for field in [("checkpoint", "resume"), ("task", "data_dir"), ("task", "augmented_dir")]
      for kind in ("root", "root, through ..", "home")),
}  # fmt: skip
#: Pairs that depend on the machine: "/" or "~" as a data source lists whatever files are there.
MACHINE_DEPENDENT = {(("data", "sources", 0, "path"), kind) for kind in ("root", "root, through ..", "home")}


def test_every_path_field_with_every_bad_path(odd_root: Path) -> None:
    odd = odd_paths(odd_root)
    for field in GENERAL_PATHS + TASK_PATHS:
        dotted = ".".join(map(str, field))
        for kind, value in {**ALWAYS_BAD, **odd}.items():
            data = with_path(odd_root, field, value)
            spec = check(write_json(odd_root, data), data)
            TALLY[f"path case {kind!r}: {'accepted' if spec is not None else 'refused'}"] += 1
            if (field, kind) in MACHINE_DEPENDENT:
                continue
            assert (spec is not None) == ((field, kind) in ACCEPTED), (dotted, kind)
            if spec is None:
                with pytest.raises(SpecError) as info:
                    load_spec(write_json(odd_root, data))
                assert any(dotted in line for line in info.value.problems), (kind, info.value.problems)


@FUZZ
@given(
    field=st.sampled_from(GENERAL_PATHS + TASK_PATHS),
    kind=st.sampled_from(sorted(ALWAYS_BAD) + sorted(odd_paths(Path("/probe")))),
    other=st.sampled_from(LEAVES),
    value=weird,
)
def test_bad_paths_with_other_mutations(odd_root: Path, field: tuple, kind: str, other: tuple, value) -> None:
    """A bad path next to a wrong value elsewhere: the paths of the sections that still validate are
    checked on their own (the path problems of a spec that fails the schema)."""
    path_value = {**ALWAYS_BAD, **odd_paths(odd_root)}[kind]
    data = with_path(odd_root, field, path_value)
    with contextlib.suppress(KeyError, IndexError, TypeError):
        data = set_in(data, other, value)
    check(write_json(odd_root, data), data)


# -- valid mutations -------------------------------------------------------------------------------

valid_changes = st.fixed_dictionaries(
    {},
    optional={
        ("train", "micro_batch_size"): st.integers(1, 512),
        ("train", "gradient_accumulation_steps"): st.integers(1, 64),
        ("train", "max_steps"): st.integers(6, 10**9),
        ("train", "lr"): st.floats(1e-8, 10.0),
        ("train", "warmup_ratio"): st.floats(0.0, 0.999),
        ("train", "min_lr_ratio"): st.floats(0.0, 1.0),
        ("train", "weight_decay"): st.floats(0.0, 1.0),
        ("train", "grad_clip"): st.floats(0.0, 100.0),
        ("train", "adam_betas"): st.lists(st.floats(0.0, 0.9999), min_size=2, max_size=2),
        ("train", "decay"): st.sampled_from(["linear", "cosine", "constant"]),
        ("train", "precision"): st.sampled_from(["bf16", "fp16", "fp32"]),
        ("train", "zero_stage"): st.sampled_from([0, 1, 2, 3]),
        ("teacher", "dtype"): st.sampled_from(["bf16", "fp16", "fp32"]),
        ("teacher", "placement"): st.sampled_from(["replicate", "zero3"]),
        ("run", "seed"): st.integers(-(2**31), 2**31),
        ("run", "name"): st.text(st.characters(categories=["L", "N"]), min_size=1, max_size=20),
        ("data", "max_seq_length"): st.integers(8, 4096),
        ("data", "shuffle_buffer"): st.integers(0, 10**6),
        ("data", "sources", 0, "weight"): st.floats(1e-6, 1e6),
        ("losses", "kd_temperature"): st.floats(0.01, 100.0),
        ("losses", "preset"): st.sampled_from(["mlkd", "tinybert", "minilmv2", "distilbert"]),
        ("logging", "every_n_steps"): st.integers(1, 10**6),
        ("checkpoint", "keep_last"): st.integers(1, 100),
    },
)


@FUZZ
@given(changes=valid_changes, world=st.integers(1, 64))
def test_valid_mutations_load_and_validate_prints_the_plan(root: Path, changes: dict, world: int) -> None:
    data = base_spec(root)
    for path, value in changes.items():
        data = set_in(data, path, value)
    path = write_json(root, data)
    spec = load_spec(path, world_size=world)
    plan = resolve_plan(spec, world)
    TALLY.update(["specs tried", "accepted, planned at every world size"])
    assert (
        plan.global_batch_size == spec.train.micro_batch_size * spec.train.gradient_accumulation_steps * world
    )
    for dotted, value in changes.items():
        got = get_in(spec.model_dump(), dotted)
        assert got == (tuple(value) if isinstance(value, list) else value)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        cli.validate(str(path), world_size=world)
    printed = out.getvalue()
    assert f"global batch   {plan.global_batch_size} sequences per step" in printed
    assert json.loads(printed.split("DeepSpeed config:\n", 1)[1]) == plan.deepspeed_config


def test_validate_cli_prints_the_plan_of_a_mutated_spec(root: Path) -> None:
    import subprocess
    import sys

    data = set_in(base_spec(root), ("train", "micro_batch_size"), 7)
    path = write_json(root, data)
    result = subprocess.run(
        [sys.executable, "-m", "mlkd_scale.cli", "validate", str(path), "--world_size", "3"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert result.returncode == 0, result.stderr
    assert "global batch   42 sequences per step" in result.stdout
    bad = set_in(data, ("train", "lr"), math.nan)
    path = write_json(root, bad)
    result = subprocess.run(
        [sys.executable, "-m", "mlkd_scale.cli", "validate", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "train.lr:" in result.stderr
