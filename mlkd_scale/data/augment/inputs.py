"""Reading the examples to augment: jsonl with named fields, or a TSV with a header (GLUE-like).

TinyBERT's per-task defaults (which GLUE columns hold the sentences and the label, and how many
variants ``n`` its code makes per task) are in the GLUE task table
(:attr:`~mlkd_scale.tasks.glue.table.GlueTask.augment`), so ``--task MNLI`` is enough for a GLUE file.
"""

from __future__ import annotations

import csv
import hashlib
import json
import sys
from pathlib import Path

from mlkd_scale.errors import AugmentInputError


def file_sha256(path: str | Path) -> str:
    """Identity of the input, recorded in settings.json so a resume on a changed file is refused."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _records(path: Path, columns: tuple[str, ...] | None):
    """(line number, dict) per example."""
    if path.suffix in (".jsonl", ".json"):
        with path.open(encoding="utf-8-sig") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield number, json.loads(line)
                    except json.JSONDecodeError as error:
                        raise AugmentInputError(f"{path}:{number} is not a JSON object ({error})") from None
        return
    if path.suffix != ".tsv":
        raise AugmentInputError(f"{path}: use a .jsonl or .tsv input file")
    csv.field_size_limit(sys.maxsize)
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = list(columns) if columns else next(reader, [])
        for number, cells in enumerate(reader, 1 if columns else 2):
            if cells:
                yield number, dict(zip(header, cells))


def read_examples(path: str | Path, text_a_field: str, text_b_field: str | None = None,
                  label_field: str | None = None, columns: tuple[str, ...] | None = None) -> list[dict]:
    """Examples as ``{"text_a", "text_b"?, "label"?}`` dicts, in file order."""
    path = Path(path)
    if not path.exists():
        raise AugmentInputError(f"{path} does not exist; pass the training file to --input")
    examples = []
    wanted = [("text_a", text_a_field), ("text_b", text_b_field), ("label", label_field)]
    for number, record in _records(path, columns):
        example = {}
        for name, field in wanted:
            if field is None:
                continue
            if field not in record:
                raise AugmentInputError(
                    f"{path}:{number} has no field {field!r} (fields: {', '.join(map(str, record))}); "
                    f"set --{name}_field")
            example[name] = record[field]
        examples.append(example)
    return examples
