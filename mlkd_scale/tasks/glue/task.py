"""GLUE for task distillation: the task registry, readers for two sources, and tokenization.

The same examples come from either source:

* the ORIGINAL GLUE distribution, ``glue_data/<TASK>/{train,dev,test}.tsv`` as written by the
  classic ``download_glue_data.py`` (MNLI: ``dev_matched.tsv``/``dev_mismatched.tsv``,
  ``test_matched.tsv``/``test_mismatched.tsv``); task teachers and TinyBERT-style augmented sets
  are usually shipped in this layout. Read with :func:`load_glue` ``(..., data_dir=<task folder>)``.
* the hub copy ``nyu-mll/glue`` through ``datasets.load_dataset``, when ``data_dir`` is ``None``.

Split names are the hub's everywhere: ``train``, ``validation``, ``test`` (MNLI:
``validation_matched``, ``validation_mismatched``, ``test_matched``, ``test_mismatched``).

**Label order.** One order per task, the hub's ``ClassLabel`` order, so hub labels pass through
unchanged and the strings in the files are mapped onto it:

=====  ===============================================  ================================
task   label index order                                 written in the TSV files as
=====  ===============================================  ================================
CoLA   unacceptable, acceptable                          0, 1
SST-2  negative, positive                                0, 1
MRPC   not_equivalent, equivalent                        0, 1
QQP    not_duplicate, duplicate                          0, 1
MNLI   entailment, neutral, contradiction                the same words
QNLI   entailment, not_entailment                        the same words
RTE    entailment, not_entailment                        the same words
WNLI   not_entailment, entailment                        0, 1
STS-B  regression: a float score in [0, 5]               the float
=====  ===============================================  ================================

Only MNLI differs from the legacy ``transformers`` processors (contradiction, entailment,
neutral); a teacher fine-tuned in that order needs its logits re-ordered: :func:`teacher_label_order`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from mlkd_scale.tasks.glue.tsv import GlueExample, TsvLayout, read_tsv

logger = logging.getLogger(__name__)

HUB_DATASET = "nyu-mll/glue"


@dataclass(frozen=True)
class GlueTask:
    """One GLUE task: where its data lives in both sources, its labels and its official metrics."""

    name: str  # GLUE's spelling, also the task's folder name in glue_data/
    config: str  # hub config: load_dataset("nyu-mll/glue", config)
    text_fields: tuple[str, ...]  # hub columns holding text_a (and text_b)
    label_names: tuple[str, ...]  # label index order; () for regression (STS-B)
    file_labels: tuple[str, ...]  # how label i is written in the TSV files
    metrics: tuple[str, ...]  # keys returned by glue_metrics.glue_metrics
    main_metric: str  # used for best-checkpoint selection (GLUE leaderboard convention)
    files: tuple[tuple[str, str, TsvLayout], ...]  # (split, file name, layout) in glue_data/<name>/
    skip_malformed: bool = False  # QQP: rows broken by stray newlines are skipped and counted

    @property
    def is_regression(self) -> bool:
        return not self.label_names

    @property
    def num_labels(self) -> int:
        """Output width of the classifier head (1 for the STS-B regressor)."""
        return 1 if self.is_regression else len(self.label_names)

    @property
    def is_pair(self) -> bool:
        return len(self.text_fields) == 2

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(split for split, _, _ in self.files)

    @property
    def dev_splits(self) -> tuple[str, ...]:
        """The labelled evaluation splits (MNLI has two; the first is used for model selection)."""
        return tuple(split for split in self.splits if split.startswith("validation"))

    def file_of(self, split: str) -> tuple[str, TsvLayout]:
        for name, file_name, layout in self.files:
            if name == split:
                return file_name, layout
        raise ValueError(
            f"GLUE task {self.name} has no split {split!r}; expected one of: {', '.join(self.splits)}"
        )


def _std_files(train: TsvLayout, test: TsvLayout) -> tuple[tuple[str, str, TsvLayout], ...]:
    return (("train", "train.tsv", train), ("validation", "dev.tsv", train), ("test", "test.tsv", test))


_PAIR_TEST = TsvLayout(("index", "sentence1", "sentence2"), text_a=1, text_b=2, guid=0)
_RTE_LIKE = TsvLayout(("index", "sentence1", "sentence2", "label"), text_a=1, text_b=2, label=3, guid=0)
_STSB_HEAD = ("index", "genre", "filename", "year", "old_index", "source1", "source2",
              "sentence1", "sentence2")  # fmt: skip
_MNLI_HEAD = ("index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
              "sentence1_parse", "sentence2_parse", "sentence1", "sentence2")  # fmt: skip
_MNLI_TEST = TsvLayout(_MNLI_HEAD, text_a=8, text_b=9, guid=0)
_MNLI_DEV = TsvLayout(_MNLI_HEAD + tuple(f"label{i}" for i in range(1, 6)) + ("gold_label",),
                      text_a=8, text_b=9, label=-1, guid=0)  # fmt: skip
_BINARY = ("0", "1")
_ACC_F1 = ("acc", "f1", "acc_and_f1")

TASKS: dict[str, GlueTask] = {
    task.config: task
    for task in (
        GlueTask("CoLA", "cola", ("sentence",), ("unacceptable", "acceptable"), _BINARY, ("mcc",), "mcc",
                 _std_files(TsvLayout(None, text_a=3, label=1, ncols=4),  # source, label, notes, sentence
                            TsvLayout(("index", "sentence"), text_a=1, guid=0))),
        GlueTask("SST-2", "sst2", ("sentence",), ("negative", "positive"), _BINARY, ("acc",), "acc",
                 _std_files(TsvLayout(("sentence", "label"), text_a=0, label=1),
                            TsvLayout(("index", "sentence"), text_a=1, guid=0))),
        GlueTask("MRPC", "mrpc", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"), _BINARY,
                 _ACC_F1, "acc_and_f1",
                 _std_files(TsvLayout(("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"),
                                      text_a=3, text_b=4, label=0),
                            TsvLayout(("index", "#1 ID", "#2 ID", "#1 String", "#2 String"),
                                      text_a=3, text_b=4, guid=0))),
        GlueTask("STS-B", "stsb", ("sentence1", "sentence2"), (), (), ("pearson", "spearman", "corr"), "corr",
                 _std_files(TsvLayout(_STSB_HEAD + ("score",), text_a=7, text_b=8, label=-1, guid=0, exact=False),
                            TsvLayout(_STSB_HEAD, text_a=7, text_b=8, guid=0, exact=False))),
        GlueTask("QQP", "qqp", ("question1", "question2"), ("not_duplicate", "duplicate"), _BINARY,
                 _ACC_F1, "acc_and_f1",
                 _std_files(TsvLayout(("id", "qid1", "qid2", "question1", "question2", "is_duplicate"),
                                      text_a=3, text_b=4, label=5, guid=0),
                            TsvLayout(("id", "question1", "question2"), text_a=1, text_b=2, guid=0)),
                 skip_malformed=True),
        GlueTask("MNLI", "mnli", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"),
                 ("entailment", "neutral", "contradiction"), ("acc",), "acc",
                 (("train", "train.tsv", TsvLayout(_MNLI_HEAD + ("label1", "gold_label"),
                                                   text_a=8, text_b=9, label=-1, guid=0)),
                  ("validation_matched", "dev_matched.tsv", _MNLI_DEV),
                  ("validation_mismatched", "dev_mismatched.tsv", _MNLI_DEV),
                  ("test_matched", "test_matched.tsv", _MNLI_TEST),
                  ("test_mismatched", "test_mismatched.tsv", _MNLI_TEST))),
        GlueTask("QNLI", "qnli", ("question", "sentence"), ("entailment", "not_entailment"),
                 ("entailment", "not_entailment"), ("acc",), "acc",
                 _std_files(TsvLayout(("index", "question", "sentence", "label"), text_a=1, text_b=2, label=3,
                                      guid=0),
                            TsvLayout(("index", "question", "sentence"), text_a=1, text_b=2, guid=0))),
        GlueTask("RTE", "rte", ("sentence1", "sentence2"), ("entailment", "not_entailment"),
                 ("entailment", "not_entailment"), ("acc",), "acc", _std_files(_RTE_LIKE, _PAIR_TEST)),
        GlueTask("WNLI", "wnli", ("sentence1", "sentence2"), ("not_entailment", "entailment"), _BINARY,
                 ("acc",), "acc", _std_files(_RTE_LIKE, _PAIR_TEST)),
    )
}  # fmt: skip


def get_task(task: str | GlueTask) -> GlueTask:
    """The registry entry for ``task``: any spelling of its name ("SST-2", "sst2", "sts_b", "MNLI")."""
    if isinstance(task, GlueTask):
        return task
    key = str(task).lower().replace("-", "").replace("_", "")
    if key not in TASKS:
        names = ", ".join(t.name for t in TASKS.values())
        raise ValueError(f"unknown GLUE task {task!r}; expected one of: {names}")
    return TASKS[key]


def load_glue(
    task: str | GlueTask, split: str, data_dir: str | os.PathLike | None = None
) -> list[GlueExample]:
    """Examples of one split, from the task's folder of the original layout or, without one, the hub.

    ``data_dir`` is the task's own folder (``glue_data/MNLI``); the ``glue_data`` root is accepted too.
    Rows that QQP's files are known to contain broken (a stray newline) are skipped with a warning.
    """
    spec = get_task(task)
    spec.file_of(split)  # rejects an unknown split before any I/O
    if data_dir is None:
        return _load_hub(spec, split)
    file_name, _ = spec.file_of(split)
    path = os.path.join(data_dir, file_name)
    nested = os.path.join(data_dir, spec.name, file_name)
    if not os.path.isfile(path) and os.path.isfile(nested):
        path = nested
    examples, skipped = read_glue_file(spec, split, path)
    if skipped:
        logger.warning("%s: skipped %d malformed row(s) of %s", spec.name, skipped, path)
    return examples


def read_glue_file(
    task: str | GlueTask, split: str, path: str | os.PathLike
) -> tuple[list[GlueExample], int]:
    """Read one TSV of the original distribution: ``(examples, number of malformed rows skipped)``.

    See :func:`~mlkd_scale.tasks.glue.tsv.read_tsv`: a malformed row, a file that is not UTF-8 and a
    file without data rows are each a one-line :class:`~mlkd_scale.errors.DataError` naming the file.
    """
    spec = get_task(task)
    _, layout = spec.file_of(split)
    return read_tsv(spec, layout, split, path)


def _load_hub(spec: GlueTask, split: str) -> list[GlueExample]:
    """The split from ``nyu-mll/glue``; hub labels are already in our order, ``-1`` means unlabelled."""
    import datasets

    data = datasets.load_dataset(HUB_DATASET, spec.config, split=split)
    missing = [c for c in (*spec.text_fields, "label", "idx") if c not in data.column_names]
    if missing:
        raise ValueError(f"hub dataset {HUB_DATASET} ({spec.config}, {split}) lacks the column(s) {missing}")
    columns = {c: list(data[c]) for c in (*spec.text_fields, "label", "idx")}
    texts_b = columns[spec.text_fields[1]] if spec.is_pair else [None] * len(columns["idx"])
    examples = []
    for idx, text_a, text_b, raw in zip(
        columns["idx"], columns[spec.text_fields[0]], texts_b, columns["label"]
    ):
        label: int | float | None
        if raw is None or raw == -1:
            if not split.startswith("test"):
                raise ValueError(f"hub {spec.config} {split} row idx={idx} has no label in a labelled split")
            label = None
        elif spec.is_regression:
            label = float(raw)
        elif int(raw) == raw and 0 <= int(raw) < spec.num_labels:
            label = int(raw)
        else:
            raise ValueError(
                f"hub {spec.config} {split} row idx={idx} has label {raw!r}, not in 0..{spec.num_labels - 1}"
            )
        examples.append(GlueExample(f"{split}-{idx}", text_a, text_b, label))
    return examples


def encode_glue(
    examples: list[GlueExample],
    tokenizer,
    max_seq_length: int,
    task: str | GlueTask | None = None,
    chunk: int = 8192,
) -> dict:
    """Tokenize examples into ``[N, max_seq_length]`` tensors for the training and evaluation loops.

    Returns ``input_ids``, ``attention_mask``, ``token_type_ids`` (padded to ``max_seq_length``,
    pairs truncated ``longest_first``, as BERT's GLUE recipe does), ``labels`` when every example
    has one (``FloatTensor`` for regression, else ``LongTensor``), and ``example_ids`` (a list of
    guids, for matching predictions back to examples). Regression is ``task.is_regression`` when a
    task is given, else read from the label types. Tokenized in chunks to bound peak memory on
    MNLI/QQP-sized sets.
    """
    import torch  # here, so that the registry and glue_metrics stay importable without torch

    if not examples:
        raise ValueError("encode_glue got no examples")
    if not isinstance(max_seq_length, int) or max_seq_length < 4:
        raise ValueError(f"max_seq_length must be an integer >= 4, got {max_seq_length!r}")
    pairs = {ex.text_b is not None for ex in examples}
    if len(pairs) > 1:
        raise ValueError("encode_glue got a mix of single sentences and sentence pairs")
    is_pair = pairs.pop()
    parts: dict[str, list] = {"input_ids": [], "attention_mask": [], "token_type_ids": []}
    for start in range(0, len(examples), chunk):
        batch = examples[start : start + chunk]
        enc = tokenizer(
            [ex.text_a for ex in batch],
            [ex.text_b for ex in batch] if is_pair else None,
            padding="max_length",
            truncation="longest_first",
            max_length=max_seq_length,
            return_tensors="pt",
            return_attention_mask=True,
            return_token_type_ids=True,
        )
        ids = enc["input_ids"]
        parts["input_ids"].append(ids.long())
        parts["attention_mask"].append(enc["attention_mask"].long())
        types = enc.get("token_type_ids")
        parts["token_type_ids"].append(
            types.long() if types is not None else torch.zeros_like(ids, dtype=torch.long)
        )
    out: dict = {key: torch.cat(value) for key, value in parts.items()}
    labels = [ex.label for ex in examples]
    if all(label is not None for label in labels):
        if task is not None:
            regression = get_task(task).is_regression
        else:
            regression = any(isinstance(label, float) for label in labels)
        out["labels"] = torch.tensor(labels, dtype=torch.float32 if regression else torch.long)
    elif any(label is not None for label in labels):
        raise ValueError("encode_glue got some labelled and some unlabelled examples")
    out["example_ids"] = [ex.guid for ex in examples]
    return out


def teacher_label_order(task: str | GlueTask, id2label: dict) -> list[int]:
    """For each of our labels, the teacher's logit column holding it (``logits[:, order]`` re-orders).

    Matches names case-insensitively (``CONTRADICTION``, ``not_entailment``, file labels "0"/"1");
    a teacher with generic ``LABEL_i`` names is assumed to use our order. An MNLI teacher from the
    legacy scripts must therefore carry real names in ``config.id2label``, or it will be misread.
    """
    spec = get_task(task)
    if spec.is_regression:
        return [0]
    names = {int(i): str(name).strip().lower() for i, name in id2label.items()}
    if len(names) != spec.num_labels:
        raise ValueError(f"teacher has {len(names)} labels, {spec.name} has {spec.num_labels}")
    if all(name == f"label_{i}" for i, name in names.items()):
        return list(range(spec.num_labels))
    order = []
    for ours, written in zip(spec.label_names, spec.file_labels):
        hits = [i for i, name in names.items() if name in (ours, written)]
        if len(hits) != 1:
            raise ValueError(
                f"cannot place {spec.name} label {ours!r} among the teacher's labels {sorted(names.values())}"
            )
        order.append(hits[0])
    return order
