"""SQuAD v1.1 / v2.0 as a task of teacher fine-tuning and task distillation.

This module joins the SQuAD pipeline (:mod:`mlkd_scale.tasks.squad.pipeline`) to the task machinery that
GLUE uses (:mod:`mlkd_scale.tasks.base`, :mod:`mlkd_scale.engine.task.stage`):

* :func:`~mlkd_scale.tasks.squad.names.squad_task_name` reads any spelling of the task name
  ('squad', 'SQuAD1.1', 'squad-v2', 'squad2.0', ...) as ``squad_v1`` or ``squad_v2``;
* :class:`SquadTask` is the :class:`~mlkd_scale.tasks.base.Task` of SQuAD runs (head, teacher,
  fine-tuning module, what the losses read, scoring);
* :func:`load_squad_task_data` reads the examples (official JSON files or the hub), cuts long
  questions to ``task.squad.max_query_length`` tokens, builds doc-stride windows for train and dev
  and returns them as the same :class:`~mlkd_scale.tasks.base.TaskData` GLUE runs get. Train
  windows carry ``start_positions``/``end_positions`` ([CLS] for no answer) and ``span_mask``;
* :class:`SquadDevSplit` scores the start/end logits of its windows: post-processing (n-best,
  maximum answer length, v2.0 null threshold) and the official EM/F1.

``span_mask`` ([F, L] bool) is True at [CLS] and on the window's context tokens: the positions a
prediction can point at (an answer's tokens, or [CLS] for "no answer"). Distillation takes the
start and end distributions over these positions only (:func:`~mlkd_scale.losses.prediction.mask_span_logits`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForQuestionAnswering, PreTrainedModel

from mlkd_scale.models.qa_head import SpanSupervisedModule, load_qa_teacher, qa_model_for_finetuning
from mlkd_scale.spec import SquadSpec, TaskSpec
from mlkd_scale.tasks.base import EncodedSplit, TaskData
from mlkd_scale.tasks.squad.names import FILES, HUB, squad_task_name
from mlkd_scale.tasks.squad.pipeline import (
    CLS_INDEX,
    SquadDataError,
    SquadExample,
    best_threshold,
    load_squad_hub,
    postprocess_predictions,
    prepare_eval_features,
    prepare_train_features,
    read_squad_json,
    squad_metrics,
)

TRAIN_KEYS = ("input_ids", "attention_mask", "token_type_ids", "start_positions", "end_positions", "span_mask")
EVAL_KEYS = ("input_ids", "attention_mask", "token_type_ids", "span_mask")


class SquadTask:
    """A SQuAD task of a run as a :class:`~mlkd_scale.tasks.base.Task`: extractive QA with a start and
    an end logit per token, scored by the official EM/F1 after post-processing."""

    span_logits = True
    is_regression = False
    head_class = AutoModelForQuestionAnswering

    def __init__(self, spec: TaskSpec):
        self.spec = spec
        self.name = spec.name  # "squad_v1" or "squad_v2"
        self.main_metric = spec.squad.selection_metric  # "f1" or "exact" (fixed null threshold)

    @staticmethod
    def accepts(name: str) -> bool:
        return squad_task_name(name) is not None

    @property
    def version_2(self) -> bool:
        return self.name == "squad_v2"

    def label_config(self) -> dict:
        return {}  # a QA head has its fixed two outputs per token

    def load_data(self, tokenizer, with_augmented: bool) -> SquadTaskData:
        return load_squad_task_data(self, tokenizer)

    def load_teacher(self, path: str, dtype: str) -> tuple[PreTrainedModel, None]:
        return load_qa_teacher(path, dtype), None

    def finetune_module(self, path: str) -> tuple[PreTrainedModel, SpanSupervisedModule]:
        model = qa_model_for_finetuning(path)
        return model, SpanSupervisedModule(model)

    def loss_inputs(self, batch: dict, inputs: dict) -> tuple[dict, None]:
        """No class labels; the start/end distributions are taken over ``span_mask``."""
        return {**inputs, "span_mask": batch["span_mask"]}, None

    def score(self, split: SquadDevSplit, predictions: torch.Tensor) -> dict[str, float]:
        return split.score(predictions)

    def teacher_eval_key(self) -> dict:
        """Windows, post-processing and data all shape the teacher's SQuAD scores."""
        return self.spec.model_dump(mode="json", include={"name", "data_dir", "squad"})


def read_split(spec: TaskSpec, split: str) -> list[SquadExample]:
    """The examples of ``split`` ('train' or 'validation'): the given file, the data_dir's file, or the hub."""
    train_name, dev_name = FILES[spec.name]
    given = spec.squad.train_file if split == "train" else spec.squad.dev_file
    if given is None and spec.data_dir is not None:
        given = str(Path(spec.data_dir).expanduser() / (train_name if split == "train" else dev_name))
        if not Path(given).is_file():
            field = "train_file" if split == "train" else "dev_file"
            raise SquadDataError(
                f"task.data_dir: {spec.data_dir} has no {Path(given).name}; put the official file there or "
                f"name the file with task.squad.{field}"
            )
    examples = read_squad_json(given) if given is not None else load_squad_hub(HUB[spec.name], split)
    if not examples:
        raise SquadDataError(
            f"{given or HUB[spec.name]}: the {split} split has no questions; give a complete official-format "
            "SQuAD JSON file"
        )
    if spec.name == "squad_v1":
        impossible = next((e.id for e in examples if e.is_impossible), None)
        if impossible is not None:
            raise SquadDataError(
                f"{given or HUB[spec.name]}: question {impossible!r} has no answer, which SQuAD v1.1 does not "
                "allow; this is v2.0 data: set task.name to squad_v2"
            )
    return examples


def limit_questions(examples: list[SquadExample], tokenizer, max_query_length: int) -> list[SquadExample]:
    """The examples with every question cut to its first ``max_query_length`` tokens (BERT's
    ``run_squad.py`` rule; ``run_qa.py`` has none). The cut is made in the text, at the end of the
    last kept token, so the features module tokenizes the same pieces again."""
    questions = [e.question.lstrip() for e in examples]
    encoded = tokenizer(questions, add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for example, question, offsets in zip(examples, questions, encoded["offset_mapping"]):
        if len(offsets) > max_query_length:
            example = dataclasses.replace(example, question=question[: offsets[max_query_length - 1][1]])
        out.append(example)
    return out


def _span_mask(features: dict) -> torch.Tensor:
    mask = features["context_mask"].clone()
    mask[:, CLS_INDEX] = True
    return mask


@dataclass
class SquadDevSplit(EncodedSplit):
    """The dev windows (model inputs) plus what turns their logits into scored answers."""

    examples: list[SquadExample] = dataclasses.field(default_factory=list)
    features: dict = dataclasses.field(default_factory=dict)  # example_index, offset_mapping
    settings: SquadSpec | None = None
    version_2: bool = False

    def score(self, logits: torch.Tensor) -> dict[str, float]:
        """Official metrics (percent) from the ``[F, 2, L]`` start/end logits of every window.

        ``exact``/``f1`` (v2.0: and ``HasAns_*``/``NoAns_*``) with the fixed null threshold; v2.0 also
        ``best_exact``/``best_f1`` and their thresholds, tuned on this dev set.
        """
        s = self.settings
        preds = postprocess_predictions(
            self.examples, self.features, logits[:, 0], logits[:, 1], s.n_best, s.max_answer_length,
            self.version_2, s.null_score_threshold,
        )
        metrics = squad_metrics(preds.answers, self.examples, self.version_2)
        if self.version_2:
            for name in ("exact", "f1"):
                best, threshold = best_threshold(preds.non_null_answers, preds.null_diffs, self.examples, name)
                metrics[f"best_{name}"], metrics[f"best_{name}_thresh"] = best, threshold
        return {key: float(value) for key, value in metrics.items()}


@dataclass
class SquadTaskData(TaskData):
    """TaskData whose splits are windows; ``describe`` counts questions and windows."""

    train_questions: int = 0

    def describe(self) -> str:
        dev = self.dev["validation"]
        return (
            f"task {self.task.name}: train {self.train_questions:,} questions in {len(self.train):,} windows, "
            f"dev {len(dev.examples):,} questions in {len(dev):,} windows"
        )


def load_squad_task_data(task: SquadTask, tokenizer) -> SquadTaskData:
    """Train and dev windows of a SQuAD task (Stage 1 trains on the same windows as Stage 2)."""
    spec = task.spec
    settings = spec.squad
    window = {"max_length": spec.max_seq_length, "doc_stride": settings.doc_stride}

    def examples(split: str) -> list[SquadExample]:
        return limit_questions(read_split(spec, split), tokenizer, settings.max_query_length)

    train_examples = examples("train")
    feats = prepare_train_features(train_examples, tokenizer, **window)
    feats["span_mask"] = _span_mask(feats)
    train = EncodedSplit({k: feats[k] for k in TRAIN_KEYS if k in feats}, feats["example_id"])

    dev_examples = examples("validation")
    dev_feats = prepare_eval_features(dev_examples, tokenizer, **window)
    dev_feats["span_mask"] = _span_mask(dev_feats)
    dev = SquadDevSplit(
        {k: dev_feats[k] for k in EVAL_KEYS if k in dev_feats},
        dev_feats["example_id"],
        examples=dev_examples,
        features={k: dev_feats[k] for k in ("example_index", "offset_mapping")},
        settings=settings,
        version_2=task.version_2,
    )
    return SquadTaskData(task, train, train, {"validation": dev}, train_questions=len(train_examples))
