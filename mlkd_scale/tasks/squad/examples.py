"""SQuAD v1.1 / v2.0 examples: read the official JSON files or the Hugging Face hub copies.

Both sources become one list of :class:`SquadExample`, so that feature building, post-processing
and metrics never care where the data came from. A v2.0 question is unanswerable exactly when it
has no gold answers (``is_impossible`` in the JSON, an empty ``answers`` on the hub).

**Answer offsets are validated.** Training labels come from ``answer_start``, so an offset that
does not point at the answer text would silently teach the student a wrong span. The official
files are consistent when read as they are; the known failure is a copy whose contexts were
whitespace-stripped (leading spaces removed, every offset then off by one or two), which is why
contexts are never stripped here. The policy, chosen per call with ``misaligned``:

* ``"repair"`` (default): when ``context[start:start + len(text)] != text`` but the text does occur
  in the context, the offset is moved to the occurrence nearest to the given one, and the number
  of repaired answers is logged once per read. Evaluation is unaffected (metrics use texts only).
* ``"error"``: any misaligned offset is a :class:`SquadDataError` naming the question id.

An answer text that does not occur in its context at all is always an error naming the id:
no offset can be trusted and the file needs fixing.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal, NamedTuple

from mlkd_scale.errors import SquadDataError
from mlkd_scale.tasks.utf8 import not_utf8

log = logging.getLogger("mlkd_scale")

Misaligned = Literal["repair", "error"]


class SquadAnswer(NamedTuple):
    """One gold answer: its text and the character offset where it starts in the context."""

    text: str
    start: int

    @property
    def end(self) -> int:
        """One past the last character of the answer in the context."""
        return self.start + len(self.text)


@dataclass(frozen=True)
class SquadExample:
    """One question on one paragraph, with zero (v2.0 unanswerable) or more gold answers.

    ``answers`` keeps every gold answer (dev sets have several, from different annotators):
    metrics take the best match over all of them, training uses the first, as the reference
    Hugging Face ``run_qa.py`` does.
    """

    id: str
    title: str
    context: str
    question: str
    answers: tuple[SquadAnswer, ...]

    @property
    def is_impossible(self) -> bool:
        """True for a v2.0 question without an answer in the paragraph."""
        return not self.answers


def _aligned(qid: str, context: str, text: str, start: int, misaligned: Misaligned) -> tuple[int, bool]:
    """The checked answer offset, and whether it had to be repaired (see the module docstring)."""
    if not text:
        raise SquadDataError(f"question {qid!r} has an empty answer text; remove that answer from the data")
    if 0 <= start and context[start : start + len(text)] == text:
        return start, False
    hits, pos = [], context.find(text)
    while pos != -1:
        hits.append(pos)
        pos = context.find(text, pos + 1)
    if not hits:
        raise SquadDataError(
            f"question {qid!r}: answer text {text!r} does not occur in its context; "
            "fix the answer text or the context in the data"
        )
    if misaligned == "error":
        raise SquadDataError(
            f"question {qid!r}: answer_start {start} does not point at {text!r} (found at {hits}); "
            "fix answer_start in the data or read it with misaligned='repair'"
        )
    return min(hits, key=lambda h: (abs(h - start), h)), True


class _Builder:
    """Builds examples from raw fields, checking ids are unique and counting repairs."""

    def __init__(self, source: str, misaligned: Misaligned):
        if misaligned not in ("repair", "error"):
            raise ValueError(f"misaligned must be 'repair' or 'error', got {misaligned!r}")
        self.source, self.misaligned = source, misaligned
        self.examples: list[SquadExample] = []
        self.ids: set[str] = set()
        self.repaired: list[str] = []

    def add(
        self,
        qid: str,
        title: str,
        context: str,
        question: str,
        texts: Iterable[str],
        starts: Iterable[int],
    ) -> None:
        qid = str(qid)
        if qid in self.ids:
            raise SquadDataError(f"{self.source}: question id {qid!r} occurs twice; ids must be unique")
        self.ids.add(qid)
        answers = []
        for text, start in zip(texts, starts, strict=True):
            start, fixed = _aligned(qid, context, text, int(start), self.misaligned)
            if fixed:
                self.repaired.append(qid)
            answers.append(SquadAnswer(text, start))
        self.examples.append(SquadExample(qid, title, context, question, tuple(answers)))

    def finish(self) -> list[SquadExample]:
        if self.repaired:
            log.warning(
                "%s: repaired %d misaligned answer_start offset(s) (first ids: %s)",
                self.source,
                len(self.repaired),
                ", ".join(self.repaired[:5]),
            )
        return self.examples


def parse_squad_json(data: Mapping, source: str = "<squad json>", misaligned: Misaligned = "repair"):
    """Examples from an already-loaded official SQuAD JSON document (v1.1 or v2.0)."""
    if not isinstance(data, Mapping) or not isinstance(data.get("data"), list):
        raise SquadDataError(f"{source} is not a SQuAD file: expected a JSON object with a 'data' list")
    builder = _Builder(source, misaligned)
    try:
        for article in data["data"]:
            title = article.get("title", "")
            for paragraph in article["paragraphs"]:
                context = paragraph["context"]
                for qa in paragraph["qas"]:
                    answers = qa.get("answers", [])
                    if qa.get("is_impossible", False):
                        answers = []  # v2.0: the official files keep only plausible_answers here
                    elif not answers:
                        raise SquadDataError(
                            f"{source}: question {qa['id']!r} has no answers but is not marked "
                            "is_impossible; add an answer or set is_impossible to true"
                        )
                    builder.add(
                        qa["id"],
                        title,
                        context,
                        qa["question"],
                        [a["text"] for a in answers],
                        [a["answer_start"] for a in answers],
                    )
    except (KeyError, TypeError) as err:
        raise SquadDataError(
            f"{source} does not have the official SQuAD layout (missing or malformed field {err}); "
            "expected data[].paragraphs[].{{context, qas[].{{id, question, answers[]}}}}"
        ) from None
    return builder.finish()


def read_squad_json(path: str | os.PathLike, misaligned: Misaligned = "repair") -> list[SquadExample]:
    """Examples from an official SQuAD JSON file (``train-v1.1.json``, ``dev-v2.0.json``, ...)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise SquadDataError(f"SQuAD file {os.fspath(path)!r} does not exist; check the path") from None
    except json.JSONDecodeError as err:
        raise SquadDataError(f"SQuAD file {os.fspath(path)!r} is not valid JSON ({err})") from None
    except UnicodeDecodeError:
        raise not_utf8(path, "SQuAD", SquadDataError) from None
    return parse_squad_json(data, os.fspath(path), misaligned)


def examples_from_rows(rows: Iterable[Mapping], source: str, misaligned: Misaligned = "repair"):
    """Examples from hub-style rows: id, title, context, question, answers{text, answer_start}."""
    builder = _Builder(source, misaligned)
    for row in rows:
        answers = row["answers"]
        builder.add(
            row["id"],
            row.get("title", ""),
            row["context"],
            row["question"],
            answers["text"],
            answers["answer_start"],
        )
    return builder.finish()


def load_squad_hub(
    name: str = "rajpurkar/squad", split: str = "validation", misaligned: Misaligned = "repair", **kwargs
) -> list[SquadExample]:
    """Examples from a hub dataset with the SQuAD columns (``rajpurkar/squad``, ``rajpurkar/squad_v2``).

    ``kwargs`` go to ``datasets.load_dataset`` (``revision``, ``cache_dir``, ...). The whole split is
    materialised: SQuAD is small (130k questions at most) and features need random access anyway.
    """
    import datasets  # imported here so that reading local files never pays for it

    ds = datasets.load_dataset(name, split=split, **kwargs)
    missing = {"id", "context", "question", "answers"} - set(ds.column_names)
    if missing:
        raise SquadDataError(
            f"hub dataset {name!r} ({split}) lacks the SQuAD column(s) {sorted(missing)}; "
            "use a dataset with id, title, context, question, answers{text, answer_start}"
        )
    return examples_from_rows(_rows(ds), f"{name} ({split})", misaligned)


def _rows(ds, batch_size: int = 1000):
    """Rows of a ``datasets.Dataset`` as dicts, read in batches (about 10x faster than ``for row in ds``)."""
    for batch in ds.iter(batch_size=batch_size):
        for i in range(len(batch["id"])):
            yield {key: column[i] for key, column in batch.items()}


def read_squad(
    source: str | os.PathLike, split: str = "validation", misaligned: Misaligned = "repair", **kwargs
) -> list[SquadExample]:
    """Examples from a local SQuAD JSON file if ``source`` is one, else from the hub dataset of that name.

    ``split`` only applies to the hub (a local file is one split).
    """
    if os.path.isfile(source) or os.fspath(source).endswith(".json"):
        return read_squad_json(source, misaligned)
    return load_squad_hub(os.fspath(source), split, misaligned, **kwargs)
