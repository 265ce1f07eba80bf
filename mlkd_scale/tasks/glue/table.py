"""The GLUE tasks: where each one's data lives, its labels, its official metrics, its augmentation defaults.

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

This module is light (no torch, no ``datasets``): the spec checks ``task.name`` against it. The
readers are in :mod:`~mlkd_scale.tasks.glue.read`, the task's run-time side in
:mod:`~mlkd_scale.tasks.glue.task`.
"""

from __future__ import annotations

from dataclasses import dataclass

HUB_DATASET = "nyu-mll/glue"


@dataclass(frozen=True)
class TsvLayout:
    """Where one file of the original distribution keeps its fields (0-based columns).

    ``header`` is the file's header row, ``None`` when it has none (CoLA train/dev), in which case
    ``ncols`` gives the column count. Only the names of the columns we read are checked, which
    catches a wrong folder without rejecting a file over a column we ignore. ``label=-1`` means
    the last column, as the legacy processors read STS-B and MNLI; ``exact=False`` accepts more
    columns than the header has (STS-B, which the legacy processor reads the same lenient way:
    sentences at 7 and 8, score last). ``guid=None``: the id is the data row number.
    """

    header: tuple[str, ...] | None
    text_a: int
    text_b: int | None = None
    label: int | None = None
    guid: int | None = None
    ncols: int = 0
    exact: bool = True

    @property
    def columns(self) -> int:
        return len(self.header) if self.header is not None else self.ncols


@dataclass(frozen=True)
class AugmentColumns:
    """TinyBERT's augmentation defaults of a task: the train.tsv columns holding the sentences and
    the label, and ``n``, the variants per sentence of its ``data_augmentation.py``."""

    text_a: str
    text_b: str | None
    label: str
    n: int
    columns: tuple[str, ...] | None = None  # for GLUE files without a header row (CoLA)


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
    def augment(self) -> AugmentColumns | None:
        """TinyBERT's augmentation defaults (None: its code has none for this task, e.g. WNLI)."""
        return AUGMENT.get(self.config)

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


# GLUE train.tsv column names; n from TinyBERT's data_augmentation.py defaults.
AUGMENT = {
    "cola": AugmentColumns("sentence", None, "label", 30, ("source", "label", "label_notes", "sentence")),
    "sst2": AugmentColumns("sentence", None, "label", 20),
    "mrpc": AugmentColumns("#1 String", "#2 String", "Quality", 30),
    "stsb": AugmentColumns("sentence1", "sentence2", "score", 30),
    "qqp": AugmentColumns("question1", "question2", "is_duplicate", 10),
    "mnli": AugmentColumns("sentence1", "sentence2", "gold_label", 10),
    "qnli": AugmentColumns("question", "sentence", "label", 20),
    "rte": AugmentColumns("sentence1", "sentence2", "label", 30),
}


def get_task(task: str | GlueTask) -> GlueTask:
    """The registry entry for ``task``: any spelling of its name ("SST-2", "sst2", "sts_b", "MNLI")."""
    if isinstance(task, GlueTask):
        return task
    key = str(task).lower().replace("-", "").replace("_", "")
    if key not in TASKS:
        names = ", ".join(t.name for t in TASKS.values())
        raise ValueError(f"unknown GLUE task {task!r}; expected one of: {names}")
    return TASKS[key]


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
