"""From a validated spec to the numbers of a run: batch arithmetic, step budget, DeepSpeed config.

The spec is the single source of truth. The DeepSpeed JSON a user references only adds settings
the spec does not own (offload, communication, bucket sizes); it may repeat an owned value, but a
*different* value is an error naming both places, because DeepSpeed would otherwise silently win
and the printed plan would lie. Values written as ``"auto"`` (Hugging Face Trainer style) are
filled from the spec.

Two settings may come from either side, for convenience with the stock ``ds_configs/zeroN.json``
files: ZeRO stage and precision. When the user did not set ``train.zero_stage`` /
``train.precision`` explicitly (Pydantic's ``model_fields_set``), the DeepSpeed file decides;
when both are set and differ, it is an error.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from typing import Any

from mlkd_scale.errors import SpecError
from mlkd_scale.spec.paths import find_deepspeed_config
from mlkd_scale.spec.reading import MAX_SPEC_BYTES, structure_problems
from mlkd_scale.spec.run import RunSpec

#: Top-level DeepSpeed keys filled from the spec, with the spec field that owns each.
OWNED_KEYS = {
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.gradient_accumulation_steps",
    "gradient_clipping": "train.grad_clip",
}
#: DeepSpeed sections that the spec's train section replaces, with what replaces them.
FORBIDDEN_SECTIONS = {
    "optimizer": "the optimizer (AdamW) is built from train.lr, train.adam_betas, train.adam_eps and "
    "train.weight_decay",
    "scheduler": "the schedule comes from train.warmup_steps / train.warmup_ratio, train.decay and "
    "train.min_lr_ratio",
}


@dataclass(frozen=True)
class Plan:
    """The derived numbers of a run, computed once and printed at start."""

    world_size: int
    micro_batch_size: int
    gradient_accumulation_steps: int
    global_batch_size: int  # sequences per optimizer step over all ranks
    tokens_per_step: int  # global_batch_size x data.max_seq_length (sequences are packed full)
    total_steps: int
    warmup_steps: int
    precision: str  # effective: train.precision, or the DeepSpeed file's when the spec left it unset
    zero_stage: int  # effective, same rule
    deepspeed_config: dict[str, Any]  # pass straight to deepspeed.initialize(config=...)

    def summary(self) -> str:
        """Human-readable plan: the numbers a user should check before a long run."""
        rows = [
            ("world size", f"{self.world_size}"),
            ("micro batch", f"{self.micro_batch_size} sequences per rank"),
            ("accumulation", f"{self.gradient_accumulation_steps} micro batches per step"),
            ("global batch", f"{self.global_batch_size} sequences per step"),
            ("tokens/step", f"{self.tokens_per_step:,}"),
            ("total steps", f"{self.total_steps:,} ({self.total_steps * self.tokens_per_step:,} tokens)"),
            ("warm-up steps", f"{self.warmup_steps:,}"),
        ]
        if not self.total_steps:  # a task run before its data is read
            rows[-2:] = [("total steps", "per stage, from the task's train size (printed when a stage starts)")]
        rows += [
            ("precision", self.precision),
            ("ZeRO stage", f"{self.zero_stage}"),
        ]
        width = max(len(name) for name, _ in rows)
        lines = [f"{name:<{width}}  {value}" for name, value in rows]
        lines.append("DeepSpeed config:")
        lines.append(json.dumps(self.deepspeed_config, indent=2))
        return "\n".join(lines)


def _same(a: Any, b: Any) -> bool:
    """Equal as config values: 16 == 16.0, but True is not 1."""
    numbers = (int, float)
    if (
        isinstance(a, numbers)
        and isinstance(b, numbers)
        and not isinstance(a, bool)
        and not isinstance(b, bool)
    ):
        return float(a) == float(b)
    return a == b


def _user_config(spec: RunSpec) -> tuple[dict[str, Any], str, list[str]]:
    """The user's DeepSpeed settings, a label naming where they came from, and read problems."""
    cfg = spec.deepspeed.config
    if cfg is None:
        return {}, "", []
    if isinstance(cfg, dict):
        return copy.deepcopy(cfg), "deepspeed.config (inline)", []
    label = f"deepspeed config {cfg}"
    path = find_deepspeed_config(cfg)
    if path is None:  # check_paths reports the missing file
        return {}, label, []
    try:
        if path.stat().st_size > MAX_SPEC_BYTES:
            return {}, label, [f"deepspeed.config: {cfg} is larger than {MAX_SPEC_BYTES // 2**20} MiB"]
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        return (
            {},
            label,
            [
                (
                    f"deepspeed.config: {cfg} is not valid JSON (line {exc.lineno} column "
                    f"{exc.colno}: {exc.msg}); fix the file"
                )
            ],
        )
    except OSError as exc:
        return {}, label, [f"deepspeed.config: cannot read {cfg} ({exc.strerror or exc})"]
    except UnicodeDecodeError:
        return {}, label, [f"deepspeed.config: {cfg} is not UTF-8 text; save it as UTF-8 JSON"]
    except RecursionError:
        return {}, label, [f"deepspeed.config: {cfg} is nested too deeply to read"]
    except ValueError as exc:  # e.g. a number with too many digits
        message = str(exc).split("; use sys.set_int_max_str_digits", 1)[0]
        return {}, label, [f"deepspeed.config: {cfg} is not valid JSON ({message}); fix the file"]
    if not isinstance(data, dict):
        return {}, label, [f"deepspeed.config: {cfg} must hold a JSON object, got a {type(data).__name__}"]
    problems = structure_problems(data)
    if problems:
        return {}, label, [f"deepspeed.config: {cfg}: {line}" for line in problems]
    return data, label, []


def _file_precision(user: dict[str, Any], label: str, problems: list[str]) -> str | None:
    """The precision a DeepSpeed config asks for, or None when it has no opinion."""
    enabled = {}
    for section in ("bf16", "fp16"):
        value = user.get(section)
        if not isinstance(value, dict):
            continue
        flag = value.get("enabled", "auto")
        if isinstance(flag, bool):
            enabled[section] = flag
        elif flag != "auto":  # "auto"/absent: no opinion; anything else is a typo, not "no opinion"
            problems.append(f'{label} sets {section}.enabled={flag!r}; use true, false or "auto"')
    if enabled.get("bf16") and enabled.get("fp16"):
        problems.append(
            f"{label} enables both bf16 and fp16; enable at most one (or let train.precision decide)"
        )
        return None
    for section in ("bf16", "fp16"):
        if enabled.get(section):
            return section
    return "fp32" if enabled else None


def _non_finite(value: Any, prefix: str = "") -> list[str]:
    """Dotted keys holding NaN or an infinity (JSON cannot carry them; DeepSpeed would misbehave)."""
    if isinstance(value, dict):
        return [k for key, v in value.items() for k in _non_finite(v, f"{prefix}{key}.")]
    if isinstance(value, list):
        return [k for i, v in enumerate(value) for k in _non_finite(v, f"{prefix}{i}.")]
    return [prefix[:-1]] if isinstance(value, float) and not math.isfinite(value) else []


def _autos(value: Any, prefix: str = "") -> list[str]:
    """Dotted keys still set to "auto" (only the spec-owned ones can be filled)."""
    if isinstance(value, dict):
        return [k for key, v in value.items() for k in _autos(v, f"{prefix}{key}.")]
    return [prefix[:-1]] if value == "auto" else []


def _offload_problems(zero: dict[str, Any], stage: int, label: str) -> list[str]:
    """Offload sections the ZeRO stage cannot honour (DeepSpeed would ignore or trip over them)."""

    def offloaded(key: str) -> bool:
        section = zero.get(key)
        return isinstance(section, dict) and section.get("device", "none") not in ("none", None)

    problems = []
    if offloaded("offload_optimizer") and stage == 0:
        problems.append(
            f"{label} sets zero_optimization.offload_optimizer but the ZeRO stage is 0; offloading the "
            "optimizer needs ZeRO stage 1, 2 or 3 (train.zero_stage)"
        )
    if offloaded("offload_param") and stage in (0, 1, 2):
        problems.append(
            f"{label} sets zero_optimization.offload_param but the ZeRO stage is {stage}; offloading "
            "parameters needs ZeRO stage 3 (train.zero_stage: 3), or remove offload_param"
        )
    return problems


def _resolve_precision(train, user: dict[str, Any], label: str, problems: list[str], fix: str) -> str:
    """``train.precision``, or the DeepSpeed file's when the spec leaves it unset; a conflict is a problem."""
    precision = train.precision
    file_precision = _file_precision(user, label, problems)
    if file_precision is not None:
        if "precision" not in train.model_fields_set:
            precision = file_precision
        elif file_precision != precision:
            problems.append(f"{label} asks for {file_precision} but train.precision is {precision}; {fix}")
    return precision


def _resolve_stage(train, zero: dict[str, Any], label: str, problems: list[str], fix: str) -> int:
    """``train.zero_stage``, or the DeepSpeed file's when the spec leaves it unset; a conflict is a problem."""
    stage = train.zero_stage
    file_stage = zero.get("stage", "auto")
    if isinstance(file_stage, float) and file_stage in (0, 1, 2, 3):
        file_stage = int(file_stage)  # 2.0 is stage 2; DeepSpeed wants an int
    if file_stage != "auto":
        if isinstance(file_stage, bool) or file_stage not in (0, 1, 2, 3):
            problems.append(f"{label} sets zero_optimization.stage={file_stage!r}; use 0, 1, 2 or 3")
        elif "zero_stage" not in train.model_fields_set:
            stage = file_stage
        elif file_stage != stage:
            problems.append(
                f"{label} sets zero_optimization.stage={file_stage} but train.zero_stage is {stage}; {fix}"
            )
    return stage


def _merge(spec: RunSpec, world_size: int | None) -> tuple[dict[str, Any], str, int, list[str]]:
    """Fill the user's DeepSpeed config from the spec; returns (config, precision, zero stage, problems).

    With ``world_size=None`` the world-size dependent ``train_batch_size`` is neither checked nor set.
    """
    train = spec.train
    user, label, problems = _user_config(spec)
    user = dict(user)
    for section in ("bf16", "bfloat16", "fp16", "zero_optimization"):
        if section in user and not isinstance(user[section], dict):
            problems.append(
                f"{label} has {section}={user.pop(section)!r}; it must be a mapping, "
                'e.g. {"enabled": true} or {"stage": 2}'
            )
    if "bfloat16" in user:  # DeepSpeed's old name for the bf16 section
        user["bf16"] = {**user.pop("bfloat16"), **user.get("bf16", {})}
    fix = "remove it from the DeepSpeed config or change the spec"

    for section, reason in FORBIDDEN_SECTIONS.items():
        if section in user:
            problems.append(f"{label} has a section '{section}'; remove it: {reason}")
            user.pop(section)

    values = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "gradient_clipping": train.grad_clip,
    }
    for key, field in OWNED_KEYS.items():
        if key in user and user[key] != "auto" and not _same(user[key], values[key]):
            problems.append(f"{label} sets {key}={user[key]} but {field} is {values[key]}; {fix}")

    if world_size is not None:
        values["train_batch_size"] = global_batch = (
            train.micro_batch_size * train.gradient_accumulation_steps * world_size
        )
        given = user.get("train_batch_size", "auto")
        if given != "auto" and not _same(given, global_batch):
            problems.append(
                f"{label} sets train_batch_size={given} but "
                f"train.micro_batch_size {train.micro_batch_size} x "
                f"train.gradient_accumulation_steps {train.gradient_accumulation_steps} x world size "
                f"{world_size} = {global_batch}; {fix}"
            )
    else:
        user.pop("train_batch_size", None)

    precision = _resolve_precision(train, user, label, problems, fix)
    zero = user.get("zero_optimization", {})
    stage = _resolve_stage(train, zero, label, problems, fix)

    problems += _offload_problems(zero, stage, label)

    filled = {**values, **{k: v for k, v in user.items() if k not in values}}
    filled["bf16"] = {**user.get("bf16", {}), "enabled": precision == "bf16"}
    filled["fp16"] = {**user.get("fp16", {}), "enabled": precision == "fp16"}
    if precision == "fp16":
        filled["fp16"].setdefault("loss_scale", 0)  # 0 = dynamic loss scaling
        filled["fp16"].setdefault("initial_scale_power", 16)
    filled["zero_optimization"] = {**zero, "stage": stage}
    filled.setdefault("steps_per_print", 10**9)  # the engine logs; DeepSpeed's own prints are noise
    filled.setdefault("wall_clock_breakdown", False)

    for key in _autos(filled):
        problems.append(f"{label} sets {key}='auto', which the spec cannot fill; give a value or remove it")
    for key in _non_finite(filled):
        problems.append(f"{label} sets {key} to a non-finite number; give a finite value or remove it")
    return filled, precision, stage, problems


def check_deepspeed(spec: RunSpec) -> list[str]:
    """DeepSpeed-config problems that do not depend on the world size (used by load_spec)."""
    return _merge(spec, world_size=None)[3]


def plan_problems(spec: RunSpec, world_size: int) -> tuple[Plan | None, list[str]]:
    """The plan and every problem found on the way (the plan is None when there are problems)."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        return None, [f"world size must be a positive integer, got {world_size!r}"]
    train = spec.train
    micro, accum = train.micro_batch_size, train.gradient_accumulation_steps
    global_batch = micro * accum * world_size
    config, precision, stage, problems = _merge(spec, world_size)

    if train.global_batch_size is not None and train.global_batch_size != global_batch:
        hint = ""
        if train.global_batch_size % (micro * world_size) == 0:
            hint = f" (e.g. gradient_accumulation_steps {train.global_batch_size // (micro * world_size)})"
        problems.append(
            f"train.global_batch_size: is {train.global_batch_size} but train.micro_batch_size {micro} x "
            f"train.gradient_accumulation_steps {accum} x world size {world_size} = {global_batch}; "
            f"change one of them{hint} or drop global_batch_size"
        )

    seq_len = spec.data.max_seq_length if spec.data is not None else spec.task.max_seq_length
    tokens_per_step = global_batch * seq_len
    if spec.task is not None:
        # A task run's steps come per stage from its train size, known once the data is read:
        # TaskContext.stage_plan (mlkd_scale.engine.task.stage) fills them in and prints them.
        total = 0
    elif train.max_steps is not None:
        total = train.max_steps
    else:
        total = -(-train.token_budget // tokens_per_step)  # exact ceil, even past 2**53
    if spec.task is not None:
        warmup = 0
    elif train.warmup_steps is not None:
        warmup = train.warmup_steps
        if warmup > total:
            problems.append(f"train.warmup_steps: {warmup} is more than the {total} total steps; lower it")
    else:
        warmup = math.ceil(train.warmup_ratio * total)

    if problems:
        return None, problems
    plan = Plan(
        world_size=world_size,
        micro_batch_size=micro,
        gradient_accumulation_steps=accum,
        global_batch_size=global_batch,
        tokens_per_step=tokens_per_step,
        total_steps=total,
        warmup_steps=warmup,
        precision=precision,
        zero_stage=stage,
        deepspeed_config=config,
    )
    return plan, []


def resolve_plan(spec: RunSpec, world_size: int) -> Plan:
    """The run's numbers for ``world_size`` ranks, or one :class:`SpecError` listing every conflict."""
    plan, problems = plan_problems(spec, world_size)
    if problems:
        raise SpecError(problems)
    return plan
