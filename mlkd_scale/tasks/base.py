"""The task protocol: everything a task run asks of its task type, in one place.

A task type (GLUE's sequence classification and regression, SQuAD's extractive question
answering; NER or multiple choice next) is one class implementing :class:`Task`, listed in
:mod:`~mlkd_scale.tasks.registry`. The engine (teacher fine-tuning, Stage 1, Stage 2, dev
evaluation, export) only talks to this protocol, so it never asks which type it runs:

============================  ==================================================================
what                          the protocol's answer
============================  ==================================================================
name, labels, head            ``name``, ``main_metric``, ``is_regression``, ``label_config()``,
                              ``head_class`` (the ``AutoModelFor...`` of teacher and student),
                              ``span_logits`` (the head scores token positions: the objective
                              distils start/end distributions over ``span_mask``)
features                      ``load_data(tokenizer, with_augmented)``: encoded train, Stage-1
                              train and dev splits
the inputs the losses read    ``loss_inputs(batch, inputs)``: what the objective gets besides the
                              model inputs (labels, a span mask)
models                        ``load_teacher(path, dtype)``, ``finetune_module(path)``
dev splits, scoring           ``score(split, predictions)``, ``teacher_eval_key()``
============================  ==================================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedModel


class Task(Protocol):
    """One task of a run (built from the spec's task section by :func:`~mlkd_scale.tasks.registry.open_task`)."""

    name: str  # canonical: "SST-2", "MNLI", "squad_v2"
    main_metric: str  # the dev metric that selects the best checkpoint (higher is better)
    is_regression: bool
    span_logits: bool  # predictions are start/end logits over the tokens [B, 2, L] (extractive QA)

    @property
    def head_class(self) -> type:
        """The ``transformers`` auto class of the task's teacher and student (its head)."""

    def label_config(self) -> dict:
        """Config overrides that give a model of ``head_class`` the task's labels, in our order."""

    def load_data(self, tokenizer, with_augmented: bool) -> TaskData:
        """Read and encode the train, Stage-1 train (augmented or not) and dev splits."""

    def load_teacher(self, path: str, dtype: str) -> tuple[PreTrainedModel, list[int] | None]:
        """The frozen fine-tuned teacher and the column order that puts its logits in our label
        order (None: they already are). A teacher without a trained head is a ``SpecError``."""

    def finetune_module(self, path: str) -> tuple[PreTrainedModel, nn.Module]:
        """The pre-trained encoder at ``path`` with the task's head, and the module that trains it
        with the supervised loss (the model as its ``student`` attribute, which export reads)."""

    def loss_inputs(self, batch: dict, inputs: dict) -> tuple[dict, torch.Tensor | None]:
        """What the distillation objective reads of a micro batch: the model ``inputs`` plus the
        task's extra inputs, and the labels (None when the task has no class labels)."""

    def score(self, split: EncodedSplit, predictions: torch.Tensor) -> dict[str, float]:
        """The official metrics of one dev split from the predictions of all its rows, in order."""

    def teacher_eval_key(self) -> dict:
        """The task settings that shape the teacher's dev scores (its cached dev metrics' key)."""


#: The tensors of an encoded split that the models take (labels separately).
TENSOR_KEYS = ("input_ids", "attention_mask", "token_type_ids", "labels")


@dataclass
class EncodedSplit:
    """One split as ``[N, L]`` tensors (``labels`` ``[N]``) plus the example ids."""

    tensors: dict[str, torch.Tensor]
    example_ids: list[str]

    def __len__(self) -> int:
        return len(self.example_ids)

    @property
    def labels(self) -> torch.Tensor:
        return self.tensors["labels"]

    def batch(self, indices: torch.Tensor | list[int], device: torch.device | str = "cpu") -> dict:
        """The rows ``indices`` as a batch dict on ``device`` (model inputs and ``labels``)."""
        index = torch.as_tensor(indices, dtype=torch.long)
        return {k: v[index].to(device, non_blocking=True) for k, v in self.tensors.items()}



@dataclass
class TaskData:
    """The encoded splits of one task run: train (original), Stage-1 train, dev split(s)."""

    task: Task
    train: EncodedSplit
    stage1_train: EncodedSplit  # the augmentation cache when task.augmented_dir is set, else train
    dev: dict[str, EncodedSplit]  # dev split name -> split; the first one selects checkpoints

    def describe(self) -> str:
        dev = ", ".join(f"{name} {len(split):,}" for name, split in self.dev.items())
        line = f"task {self.task.name}: train {len(self.train):,} examples, dev: {dev}"
        if self.stage1_train is not self.train:
            line += f"; Stage 1 trains on {len(self.stage1_train):,} augmented examples"
        return line
