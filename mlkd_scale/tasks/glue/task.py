"""A GLUE task as a :class:`~mlkd_scale.tasks.base.Task`: sequence classification (or STS-B's
regression) with the task's labels in our order, official metrics, TinyBERT-style augmentation.

Stage 1 may train on a TinyBERT-style augmentation cache (``task.augmented_dir``, written by
``launchers/augment.py``); its rows carry the label as the train file spells it.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForSequenceClassification, PreTrainedModel

from mlkd_scale.data.augment.augmenter import load_augmented
from mlkd_scale.errors import SpecError
from mlkd_scale.models.classifier_head import SupervisedModule
from mlkd_scale.models.teacher import DTYPES, freeze
from mlkd_scale.spec import TaskSpec
from mlkd_scale.tasks.base import TENSOR_KEYS, EncodedSplit, TaskData
from mlkd_scale.tasks.glue.metrics import glue_metrics
from mlkd_scale.tasks.glue.read import encode_glue, load_glue
from mlkd_scale.tasks.glue.table import GlueTask, get_task, teacher_label_order
from mlkd_scale.tasks.glue.tsv import GlueExample


def encode_split(examples: list[GlueExample], tokenizer, max_seq_length: int, task: GlueTask) -> EncodedSplit:
    """A labelled split as ``[N, max_seq_length]`` tensors (see :func:`encode_glue`)."""
    encoded = encode_glue(examples, tokenizer, max_seq_length, task)
    if "labels" not in encoded:
        raise ValueError(f"{task.name}: the split has no labels; training and evaluation need labelled data")
    return EncodedSplit({k: encoded[k] for k in TENSOR_KEYS}, encoded["example_ids"])


def augmented_examples(task: GlueTask, cache_dir: str) -> list[GlueExample]:
    """The rows of a finished augmentation cache as labelled examples of ``task``."""
    examples = []
    for row in load_augmented(cache_dir):
        if "label" not in row:
            raise ValueError(
                f"augmentation cache {cache_dir} has no 'label' field; augment the train file with --task "
                f"{task.name} (or --label_field) so that the labels are kept"
            )
        guid = f"aug-{row['example_index']}-{row['variant']}"
        examples.append(GlueExample(guid, row["text_a"], row.get("text_b"), parse_label(task, row["label"])))
    return examples


def parse_label(task: GlueTask, raw) -> int | float:
    """A label as the train file, the hub or a label name writes it -> our index (or STS-B float)."""
    if task.is_regression:
        return float(raw)
    text = str(raw).strip()
    for names in (task.file_labels, task.label_names):
        if text in names:
            return names.index(text)
    if isinstance(raw, int) and 0 <= raw < task.num_labels:
        return raw
    raise ValueError(f"label {raw!r} is not a {task.name} label (one of {list(task.file_labels)})")


class Glue:
    """One GLUE task of a run; ``info`` is its row of the GLUE table."""

    span_logits = False
    head_class = AutoModelForSequenceClassification

    def __init__(self, spec: TaskSpec):
        self.spec = spec
        self.info = get_task(spec.name)

    @staticmethod
    def accepts(name: str) -> bool:
        try:
            get_task(name)
        except ValueError:
            return False
        return True

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def main_metric(self) -> str:
        return self.info.main_metric

    @property
    def is_regression(self) -> bool:
        return self.info.is_regression

    @property
    def num_labels(self) -> int:
        return self.info.num_labels

    def label_config(self) -> dict:
        if self.is_regression:
            return {"num_labels": 1, "problem_type": "regression"}
        return {
            "num_labels": self.num_labels,
            "id2label": dict(enumerate(self.info.label_names)),
            "label2id": {name: i for i, name in enumerate(self.info.label_names)},
            "problem_type": "single_label_classification",
        }

    def load_data(self, tokenizer, with_augmented: bool) -> TaskData:
        spec, task = self.spec, self.info

        def encode(examples: list[GlueExample]) -> EncodedSplit:
            return encode_split(examples, tokenizer, spec.max_seq_length, task)

        train = encode(load_glue(task, "train", spec.data_dir))
        dev = {split: encode(load_glue(task, split, spec.data_dir)) for split in task.dev_splits}
        stage1 = train
        if with_augmented and spec.augmented_dir is not None:
            stage1 = encode(augmented_examples(task, spec.augmented_dir))
        return TaskData(self, train, stage1, dev)

    def load_teacher(self, path: str, dtype: str) -> tuple[PreTrainedModel, list[int] | None]:
        teacher, info = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=DTYPES[dtype], output_loading_info=True
        )
        fresh = [k for k in info.get("missing_keys", []) if "classifier" in k or "score" in k]
        if fresh:
            raise SpecError(
                f"teacher.path: {path} has no trained classification head (e.g. {min(fresh)} is missing); "
                "task distillation needs a fine-tuned task teacher: make one with launchers/finetune_teacher.py"
            )
        if teacher.config.num_labels != self.num_labels:
            raise SpecError(
                f"teacher.path: {path} predicts {teacher.config.num_labels} labels but {self.name} has "
                f"{self.num_labels}; give a teacher fine-tuned on {self.name}"
            )
        try:
            order = teacher_label_order(self.info, teacher.config.id2label)
        except ValueError as error:
            raise SpecError(f"teacher.path: {error}") from None
        return freeze(teacher), (None if order == list(range(len(order))) else order)

    def finetune_module(self, path: str) -> tuple[PreTrainedModel, SupervisedModule]:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=torch.float32, ignore_mismatched_sizes=True, **self.label_config()
        )
        return model, SupervisedModule(model, self.is_regression)

    def loss_inputs(self, batch: dict, inputs: dict) -> tuple[dict, torch.Tensor | None]:
        return inputs, batch["labels"]

    def score(self, split: EncodedSplit, predictions: torch.Tensor) -> dict[str, float]:
        return glue_metrics(self.info, predictions, split.labels)

    def teacher_eval_key(self) -> dict:
        return {}
