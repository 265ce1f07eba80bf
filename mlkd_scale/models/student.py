"""Building the student from the teacher: its config, its class, its initial weights."""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from mlkd_scale.models.taps import encoder_modules
from mlkd_scale.spec import StudentSpec, every_other_layers, init_layer_choice, width_problem


def build_student_config(teacher_config: PretrainedConfig, spec: StudentSpec) -> PretrainedConfig:
    """The teacher's config with the student's depth, width, heads and FFN size.

    Everything that ties the student to the teacher's inputs and outputs stays the teacher's:
    vocabulary, positions, token types, padding id, labels. The head count only has to divide the
    student's own width; it need not divide (or equal) the teacher's.
    """
    config = copy.deepcopy(teacher_config)
    config.num_hidden_layers = spec.num_layers
    config.hidden_size = spec.hidden_size
    config.num_attention_heads = spec.num_heads
    config.intermediate_size = spec.intermediate_size
    return config


def build_student(teacher: PreTrainedModel, spec: StudentSpec, init_layers: list[int]) -> PreTrainedModel:
    """A student of the teacher's class (so a task or MLM teacher gets a student with the same head).

    * ``random``: fresh weights from the class's own initialiser.
    * ``teacher_layers``: the teacher's embeddings, the teacher layers ``init_layers`` (1-based, one
      per student layer; :func:`resolve_init_layers`) and any head or pooler are copied; needs equal
      width and FFN size (head counts may differ: Q, K, V and W^O are d×d whatever the number of heads).
    * ``path``: an existing Hugging Face directory; its own config wins over the spec's architecture.
    The student is always fp32 (mixed precision is DeepSpeed's job) and uses SDPA attention.
    """
    model_class = type(teacher)
    if spec.init == "path":
        return model_class.from_pretrained(spec.path, dtype=torch.float32)
    config = build_student_config(teacher.config, spec)
    student = model_class(config).to(torch.float32)
    if spec.init == "teacher_layers":
        copy_teacher_layers(teacher, student, init_layers)
    return student


def resolve_init_layers(spec: StudentSpec, preset: str, layer_map: list[int], num_teacher_layers: int) -> list[int]:
    """The teacher layers (1-based) that ``init='teacher_layers'`` copies into student layers 1..N.

    ``student.init_layers``: 'mapping' is the loss's layer mapping ``layer_map``; 'every_other' is
    DistilBERT's choice (:func:`~mlkd_scale.spec.teacher_fit.every_other_layers`), the default of
    the distilbert preset; a list is taken as given.
    """
    choice = init_layer_choice(spec, preset)
    if choice == "mapping":
        return list(layer_map)
    if choice == "every_other":
        return every_other_layers(spec.num_layers, num_teacher_layers)
    return list(choice)


def copy_teacher_layers(teacher: PreTrainedModel, student: PreTrainedModel, init_layers: list[int]) -> None:
    """Copy embeddings, the teacher layers ``init_layers`` and everything outside the encoder."""
    s_cfg = student.config
    problem = width_problem(s_cfg.hidden_size, s_cfg.intermediate_size, teacher.config.to_dict(), "the teacher")
    if problem:
        raise ValueError(problem)
    t_emb, t_layers = encoder_modules(teacher)
    s_emb, s_layers = encoder_modules(student)
    with torch.no_grad():
        _copy_module(t_emb, s_emb)
        for s_index, t_layer in enumerate(init_layers):
            _copy_module(t_layers[t_layer - 1], s_layers[s_index])
        encoder_params = {id(p) for p in nn.ModuleList([t_emb, t_layers]).parameters()}
        t_rest = {k: v for k, v in teacher.named_parameters() if id(v) not in encoder_params}
        s_params = dict(student.named_parameters())
        with gathered(t_rest.values()):
            for name, value in t_rest.items():
                if name in s_params and s_params[name].shape == value.shape:
                    s_params[name].copy_(value.to(s_params[name].dtype))


def _copy_module(source: nn.Module, target: nn.Module) -> None:
    with gathered(source.parameters()):
        target.load_state_dict({k: v.to(torch.float32) for k, v in source.state_dict().items()})


def gathered(params) -> contextlib.AbstractContextManager:
    """Whole parameters for the duration of the block: a ZeRO-3 partitioned teacher's are gathered
    (one module at a time, so the whole teacher never sits on one rank); plain ones as they are."""
    params = list(params)
    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params)
