"""Where the teacher lives on each rank: a full copy (``replicate``) or a ZeRO-3 partition (``zero3``).

The teacher is loaded once per rank (frozen, eval, ``teacher.dtype``) and then *placed*:

* ``replicate`` (the default): moved whole to this rank's device, as a plain module.
* ``zero3``: each parameter is split across the ranks by ``deepspeed.zero.Init(module=...)`` (one
  parameter at a time goes to the device, is partitioned and freed, so the device never holds the
  whole teacher), then wrapped by ``deepspeed.initialize`` *without an optimizer*, which gives a
  ZeRO-3 engine whose hooks gather each layer's parameters just before that layer runs and free
  them right after. The teacher's forward is still a plain call of the Hugging Face module, so the
  feature taps (forward hooks, :mod:`mlkd_scale.models.taps`) work unchanged; every rank must run
  the same number of teacher forwards (each gathers collectively), which the training loops and the
  dev evaluation already do.

Either way the teacher stays outside the student's module, optimizer and checkpoints. Parameters
keep their loaded dtype (DeepSpeed does not cast a model that ``zero.Init`` has already
partitioned); the engine's bf16/fp16 section only declares it. The ZeRO-3 settings of the run's
DeepSpeed config that concern parameters (:data:`INHERITED_ZERO_KEYS`, e.g. ``offload_param`` or
``stage3_param_persistence_threshold``) apply to the teacher's engine too; nothing else does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator
from transformers import PreTrainedModel

from mlkd_scale.spec import SpecError, TeacherSpec
from mlkd_scale.spec.plan import Plan

#: ``zero_optimization`` keys of the run's DeepSpeed config that the teacher's engine inherits.
INHERITED_ZERO_KEYS = (
    "offload_param",
    "stage3_param_persistence_threshold",
    "stage3_model_persistence_threshold",
    "stage3_prefetch_bucket_size",
    "stage3_max_live_parameters",
    "stage3_max_reuse_distance",
)


@dataclass
class PlacedTeacher:
    """The placed teacher; ``engine`` (zero3 only) owns the hooks that gather its parameters."""

    model: PreTrainedModel
    placement: str
    engine: Any = None

    def describe(self) -> str:
        """One line for the run's log: placement and the parameter bytes this rank holds."""
        held, full = parameter_bytes(self.model)
        line = f"teacher: {self.placement}, this rank holds {held / 2**20:,.1f} of {full / 2**20:,.1f} MiB of parameters"
        partitions = {str(p.ds_tensor.device.type) for p in self.model.parameters() if hasattr(p, "ds_tensor")}
        return line + (f" (partitions on {', '.join(sorted(partitions))})" if partitions else "")


def teacher_deepspeed_config(plan: Plan, dtype: str) -> dict[str, Any]:
    """The optimizer-less ZeRO-3 engine's config: stage 3, the teacher's dtype, the run's micro
    batch, and the parameter settings of the run's own ``zero_optimization`` section."""
    run_zero = plan.deepspeed_config.get("zero_optimization", {})
    zero = {"stage": 3, **{key: run_zero[key] for key in INHERITED_ZERO_KEYS if key in run_zero}}
    return {
        "train_micro_batch_size_per_gpu": plan.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == "bf16"},
        "fp16": {"enabled": dtype == "fp16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def place_teacher(teacher: PreTrainedModel, spec: TeacherSpec, plan: Plan, device: torch.device) -> PlacedTeacher:
    """Put a loaded, frozen teacher where ``spec.placement`` says (see the module docstring).

    Call it after anything that copies the teacher's weights on the host (e.g. a student initialised
    from teacher layers) — though :func:`mlkd_scale.models.student.copy_teacher_layers` also gathers
    a partitioned teacher. Raises :class:`SpecError` for a combination DeepSpeed cannot run.
    """
    if spec.placement == "replicate":
        return PlacedTeacher(teacher.to(device), "replicate")
    config = teacher_deepspeed_config(plan, spec.dtype)
    accelerator = get_accelerator()
    if spec.dtype == "fp16" and not accelerator.is_fp16_supported():
        raise SpecError(
            f"teacher.dtype: fp16 with teacher.placement 'zero3' needs fp16 support, which DeepSpeed's "
            f"'{accelerator.device_name()}' accelerator lacks here; use bf16 or fp32, or placement 'replicate'"
        )
    if spec.dtype == "bf16" and not accelerator.is_bf16_supported():
        raise SpecError(
            f"teacher.dtype: bf16 with teacher.placement 'zero3' needs bf16 support, which DeepSpeed's "
            f"'{accelerator.device_name()}' accelerator lacks here; use fp16 or fp32, or placement 'replicate'"
        )
    try:
        deepspeed.zero.Init(module=teacher, config_dict_or_path=config)
        engine, _, _, _ = deepspeed.initialize(model=teacher, config=config)
    except (AssertionError, ValueError) as error:  # DeepSpeed's config checks
        raise SpecError(
            f"teacher.placement: 'zero3': DeepSpeed refused the teacher's ZeRO-3 engine ({error}); check the "
            f"zero_optimization keys the teacher inherits ({', '.join(INHERITED_ZERO_KEYS)}) or use 'replicate'"
        ) from None
    engine.eval()
    return PlacedTeacher(teacher, "zero3", engine)


def parameter_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """``(bytes of parameters this rank holds now, bytes of the whole model's parameters)``.

    A ZeRO-3 parameter counts its partition (``ds_tensor``, padding included) plus its full data
    while it is gathered (e.g. a persistent small parameter after the first forward).
    """
    held = full = 0
    for param in model.parameters():
        size = param.element_size()
        if hasattr(param, "ds_tensor"):
            full += param.ds_numel * size
            held += param.ds_tensor.numel() * param.ds_tensor.element_size()
            held += param.data.numel() * size  # empty unless gathered
        else:
            full += param.numel() * size
            held += param.numel() * size
    return held, full
