"""The reader of the TSV files of the original GLUE distribution.

:mod:`mlkd_scale.tasks.glue.table` holds the task table and says which layout (:class:`TsvLayout`)
each split's file has; this module reads one such file into :class:`GlueExample` rows. Everything wrong with a file is one
:class:`~mlkd_scale.errors.DataError` line naming the file (and the line, or the byte offset) and the
fix: a malformed row (except for QQP, whose known broken rows are skipped and counted), a wrong
header, bytes that are not UTF-8, and a file with no data rows at all (a header alone, or nothing),
which would otherwise surface much later as "got no examples" without naming any file.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass

from mlkd_scale.errors import DataError
from mlkd_scale.tasks.glue.table import GlueTask, TsvLayout
from mlkd_scale.tasks.utf8 import not_utf8


@dataclass(frozen=True)
class GlueExample:
    """One example: ``label`` is a class index, a float (STS-B), or ``None`` (unlabelled test)."""

    guid: str
    text_a: str
    text_b: str | None
    label: int | float | None


def read_tsv(
    spec: GlueTask, layout: TsvLayout, split: str, path: str | os.PathLike
) -> tuple[list[GlueExample], int]:
    """The examples of one TSV file of ``spec``'s ``split`` and the number of malformed rows skipped.

    ``QUOTE_NONE`` because the texts contain unbalanced quotes; ``utf-8-sig`` because MRPC's
    train/dev files carry the byte-order mark of Microsoft's original.
    """
    if not os.path.isfile(path):
        raise DataError(
            f"GLUE file {path} not found; data_dir must be the task's folder in the original layout "
            f"(e.g. glue_data/{spec.name}) holding {os.path.basename(path)}"
        )
    examples: list[GlueExample] = []
    skipped = 0
    with open(path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        try:
            for row in reader:
                where = f"{path} line {reader.line_num}"
                if layout.header is not None and reader.line_num == 1:
                    _check_header(spec, layout, row, where)
                    continue
                if not row:
                    continue
                try:
                    examples.append(_row_example(spec, layout, split, row, len(examples)))
                except ValueError as err:
                    if not spec.skip_malformed:
                        raise DataError(f"{where}: {err}") from None
                    skipped += 1
        except csv.Error as err:
            raise DataError(f"{path} line {reader.line_num}: unreadable TSV row ({err})") from None
        except UnicodeDecodeError:
            raise not_utf8(path, f"GLUE {spec.name}") from None
    if not examples:
        what = f"{skipped} malformed rows and no others" if skipped else "no data rows (a header at most)"
        raise DataError(
            f"{path}: the {spec.name} {split} file has {what}; give the complete {os.path.basename(path)} of "
            f"the original GLUE distribution (or leave task.data_dir unset to read the hub copy)"
        )
    return examples, skipped


def _check_header(spec: GlueTask, layout: TsvLayout, row: list[str], where: str) -> None:
    used = [i for i in (layout.text_a, layout.text_b, layout.label, layout.guid) if i is not None]
    got = [cell.strip() for cell in row]
    if any(-len(got) > i or i >= len(got) or got[i] != layout.header[i] for i in used):
        raise DataError(
            f"{where}: header {got} is not the original GLUE {spec.name} header {list(layout.header)}; "
            f"is this the {spec.name} folder?"
        )


def _row_example(spec: GlueTask, layout: TsvLayout, split: str, row: list[str], n: int) -> GlueExample:
    """One data row -> example; ``ValueError`` (without location) when the row is malformed."""
    want = layout.columns
    if len(row) != want and (layout.exact or len(row) < want):
        raise ValueError(
            f"expected {want}{'' if layout.exact else ' or more'} tab-separated columns, got {len(row)}"
        )
    label: int | float | None = None
    if layout.label is not None:
        raw = row[layout.label].strip()
        if spec.is_regression:
            try:
                label = float(raw)
            except ValueError:
                label = math.nan
            if not math.isfinite(label):
                raise ValueError(f"score {raw!r} is not a number")
        elif raw in spec.file_labels:
            label = spec.file_labels.index(raw)
        else:
            raise ValueError(f"label {raw!r} is not one of {list(spec.file_labels)}")
    guid = row[layout.guid] if layout.guid is not None else str(n)
    text_b = row[layout.text_b] if layout.text_b is not None else None
    return GlueExample(f"{split}-{guid}", row[layout.text_a], text_b, label)
