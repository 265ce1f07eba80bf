"""Reading GLUE: the original TSV distribution or the hub copy ``nyu-mll/glue``, and tokenization.

The same examples come from either source (see :mod:`~mlkd_scale.tasks.glue.table` for the files,
the label order and how labels are written).
"""

from __future__ import annotations

import logging
import os

from mlkd_scale.tasks.glue.table import HUB_DATASET, GlueTask, get_task
from mlkd_scale.tasks.glue.tsv import GlueExample, read_tsv

logger = logging.getLogger(__name__)


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
