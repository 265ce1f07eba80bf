"""Loading the teacher: frozen, in eval mode, in its inference dtype."""

from __future__ import annotations

import logging

import torch
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel

from mlkd_scale.spec import RunSpec, SpecError, model_fit_problems

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

log = logging.getLogger("mlkd_scale")


def load_teacher(
    path: str, dtype: str = "bf16", model_class=AutoModel, warn_missing: bool = False
) -> PreTrainedModel:
    """Load a teacher that is never trained: no grads, eval mode (no dropout), ``dtype`` weights.

    ``path`` is a local Hugging Face directory or a hub name. ``model_class`` picks the head
    (``AutoModel`` for general distillation, ``AutoModelForMaskedLM`` for the distilbert preset's
    MLM terms, a task class for task distillation). With ``warn_missing`` (rank 0), weights the
    checkpoint lacks, e.g. the MLM head ``cls.predictions.*`` of a sentence encoder, are logged as
    a warning: those are freshly initialised, so the teacher's predictions from them mean nothing.
    """
    teacher, info = model_class.from_pretrained(path, dtype=DTYPES[dtype], output_loading_info=True)
    missing = sorted(info.get("missing_keys", []))
    if warn_missing and missing:
        heads = sorted({".".join(key.split(".")[:2]) for key in missing})
        log.warning(
            "teacher %s has no trained weights for %s (%d missing, e.g. %s): %s initialised them at random, "
            "so the loss terms that read them learn noise; use a teacher checkpoint with this head",
            path,
            ", ".join(heads),
            len(missing),
            missing[0],
            type(teacher).__name__,
        )
    return freeze(teacher)


def freeze(model: PreTrainedModel) -> PreTrainedModel:
    """Put a model in inference state: eval mode and every parameter frozen."""
    model.eval()
    model.requires_grad_(False)
    return model


def token_id_count(tokenizer) -> int:
    """How many token ids ``tokenizer`` can produce: its length or its largest id + 1, whichever is more."""
    return max(len(tokenizer), max(tokenizer.get_vocab().values(), default=-1) + 1)


def check_model_fit(spec: RunSpec, tokenizer, teacher_config: PretrainedConfig | None = None) -> None:
    """Raise one :class:`~mlkd_scale.spec.SpecError` when ``tokenizer`` (the run's, loaded from
    ``teacher.path``) has more ids than the teacher's (or a ``student.path`` student's) ``vocab_size``,
    or the run's sequences are longer than their position tables.

    Reads configs only, so it runs before any weight is loaded or engine built: the same rules
    ``mlkd-scale validate`` applies to local directories, here for hub names too.
    """
    teacher_config = teacher_config or AutoConfig.from_pretrained(spec.teacher.path)
    token_ids = token_id_count(tokenizer)
    where = f"teacher.path {spec.teacher.path}"
    problems = model_fit_problems(spec, teacher_config.to_dict(), token_ids, "teacher.path", where)
    if spec.student.init == "path" and spec.student.path:
        student = AutoConfig.from_pretrained(spec.student.path).to_dict()
        problems += model_fit_problems(
            spec, student, token_ids, "student.path", f"student.path {spec.student.path}"
        )
    if problems:
        raise SpecError(problems)
