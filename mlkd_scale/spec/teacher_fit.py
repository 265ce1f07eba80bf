"""Whether the student section, the tokenizer and the sequence length fit the teacher: rules that need
the teacher's config.

Checked twice with the same functions, :func:`teacher_fit_problems` and :func:`model_fit_problems`:
by ``load_spec`` (so ``mlkd-scale validate`` reports them) when ``teacher.path`` (or
``student.path``) is a local directory whose ``config.json`` and tokenizer files can be read, and by
the runs before any weight is loaded or engine is built (a hub model's config is only known then).
Both raise one :class:`~mlkd_scale.spec.SpecError` line per problem. Without them, a tokenizer with
more ids than the model's ``vocab_size`` ends in ``IndexError: index out of range in self`` on the
first forward (a device-side assert on a GPU), and so does a sequence longer than its position table.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlkd_scale.spec.fs import PathProblem, expand, probe
from mlkd_scale.spec.paths import looks_local
from mlkd_scale.spec.run import RunSpec
from mlkd_scale.spec.sections import StudentSpec


def every_other_layers(num_student_layers: int, num_teacher_layers: int) -> list[int]:
    """DistilBERT's initialisation layers: every other teacher layer, counted from both ends (1-based).

    huggingface transformers ``examples/research_projects/distillation/scripts/extract_distilbert.py``
    initialises the 6 layers of DistilBERT from BERT-base's layers ``[0, 2, 4, 7, 9, 11]`` (0-based):
    every other layer from the bottom for the lower half and from the top for the upper half, so the
    first and the last teacher layer are both kept. For N of M layers: the lower ``floor(N/2)`` student
    layers take teacher layers ``2k - 1`` (k = 1, 2, ...), the upper ``ceil(N/2)`` take
    ``M, M - 2, ...`` from the top; 6 of 12 gives 1, 3, 5, 8, 10, 12, exactly the published choice.
    Needs ``2N <= M + 1`` (else two picked layers would be neighbours).
    """
    n, m = num_student_layers, num_teacher_layers
    if 2 * n > m + 1:
        raise ValueError(
            f"student.init_layers: 'every_other' needs a teacher with at least 2N - 1 layers, the teacher has "
            f"{m} for {n} student layers; give an explicit list of {n} teacher layers or 'mapping'"
        )
    lower, upper = n // 2, n - n // 2
    return [2 * k - 1 for k in range(1, lower + 1)] + [m - 2 * (upper - k) for k in range(1, upper + 1)]


def init_layer_choice(student: StudentSpec, preset: str) -> str | list[int]:
    """``student.init_layers`` with its default filled in: 'every_other' for distilbert, else 'mapping'."""
    if student.init_layers is not None:
        return student.init_layers
    return "every_other" if preset == "distilbert" else "mapping"


def width_problem(
    hidden_size: int, intermediate_size: int, teacher: Mapping[str, Any], where: str
) -> str | None:
    """The problem of copying teacher weights into a student of another width or FFN size, if any."""
    t_sizes = (teacher.get("hidden_size"), teacher.get("intermediate_size"))
    s_sizes = (hidden_size, intermediate_size)
    if None in t_sizes or t_sizes == s_sizes:
        return None
    return (
        f"student.init: 'teacher_layers' needs the teacher's width and FFN size ({where}: hidden_size "
        f"{t_sizes[0]}, intermediate_size {t_sizes[1]}), the student has hidden_size {s_sizes[0]}, "
        f"intermediate_size {s_sizes[1]}; set them to the teacher's or use init 'random'"
    )


def teacher_fit_problems(spec: RunSpec, teacher: Mapping[str, Any], where: str) -> list[str]:
    """Problems of ``spec.student`` against the teacher's config ``teacher`` (a ``config.json`` dict).

    ``where`` names the teacher in the messages (its path). Keys the config lacks are not checked.
    """
    student = spec.student
    if student.init != "teacher_layers":
        return []
    problems = [
        p for p in [width_problem(student.hidden_size, student.intermediate_size, teacher, where)] if p
    ]
    depth = teacher.get("num_hidden_layers")
    choice = init_layer_choice(student, spec.losses.preset)
    if not isinstance(depth, int):
        return problems
    if choice == "every_other":
        try:
            every_other_layers(student.num_layers, depth)
        except ValueError as error:
            problems.append(str(error))
    elif isinstance(choice, list):
        bad = [layer for layer in choice if layer > depth]
        if bad:
            problems.append(
                f"student.init_layers: entries {bad} are outside the teacher's layers 1..{depth} ({where})"
            )
    return problems


#: Model types whose position ids start after the padding index (RoBERTa's ``padding_idx + 1`` offset).
_OFFSET_POSITIONS = frozenset(
    {
        "roberta",
        "xlm-roberta",
        "xlm-roberta-xl",
        "camembert",
        "longformer",
        "data2vec-text",
        "xmod",
        "roberta-prelayernorm",
        "ernie_m",
    }
)


def usable_positions(config: Mapping[str, Any]) -> int | None:
    """The longest sequence a model with ``config`` can embed (None when the config does not say)."""
    positions = config.get("max_position_embeddings")
    if not isinstance(positions, int) or isinstance(positions, bool):
        return None
    if config.get("model_type") in _OFFSET_POSITIONS:
        pad = config.get("pad_token_id")
        positions -= (pad if isinstance(pad, int) else 1) + 1
    return positions


def sequence_length(spec: RunSpec) -> tuple[str, int]:
    """The spec field that sets the tokens per sequence, and its value."""
    if spec.task is not None:
        return "task.max_seq_length", spec.task.max_seq_length
    return "data.max_seq_length", spec.data.max_seq_length if spec.data is not None else 0


def model_fit_problems(
    spec: RunSpec, config: Mapping[str, Any], token_ids: int | None, field: str, where: str
) -> list[str]:
    """Problems of feeding the tokenizer's ids and the run's sequences to the model of ``config``.

    ``token_ids`` is how many ids the tokenizer (``teacher.path``'s, the run's tokenizer) can produce,
    its largest id + 1 (None: unknown); ``field`` the spec field of the model, ``where`` its name in
    messages. Keys the config lacks are not checked.
    """
    problems = []
    vocab = config.get("vocab_size")
    if isinstance(token_ids, int) and isinstance(vocab, int) and token_ids > vocab:
        problems.append(
            f"{field}: the tokenizer of teacher.path {spec.teacher.path} produces {token_ids:,} token ids but "
            f"{where} has vocab_size {vocab:,} (config.json), so ids {vocab:,} and up have no embedding; give "
            "the model together with the tokenizer it was trained with, or one whose vocab_size covers it"
        )
    length_field, length = sequence_length(spec)
    usable = usable_positions(config)
    if usable is not None and length > usable:
        problems.append(
            f"{length_field}: {length} tokens per sequence, but {where} has max_position_embeddings "
            f"{config['max_position_embeddings']} (config.json), room for {usable} positions; lower "
            f"{length_field} to {usable} or less"
        )
    return problems


def _read_json(path: Path) -> Any:
    """The JSON in ``path``, or None when it is missing or unreadable (the paths check reports those)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _int_values(mapping: Any) -> list[int]:
    if not isinstance(mapping, dict):
        return []
    return [v for v in mapping.values() if isinstance(v, int) and not isinstance(v, bool)]


def _vocab_txt_ids(path: Path) -> list[int]:
    try:
        with path.open("rb") as f:
            count = sum(1 for _ in f)
    except OSError:
        return []
    return [count - 1] if count else []


def tokenizer_id_count(directory: str | Path) -> int | None:
    """How many token ids the tokenizer saved in ``directory`` can produce (its largest id + 1).

    Read from the files ``save_pretrained`` writes, without loading ``transformers``: ``tokenizer.json``
    (the model's vocabulary and its added tokens), else ``vocab.txt`` (WordPiece) or ``vocab.json``
    (BPE), plus ``added_tokens.json`` and ``tokenizer_config.json``'s ``added_tokens_decoder``. None
    when none of them is there (e.g. a SentencePiece model file): the run checks the loaded tokenizer.
    """
    base = Path(directory)
    ids: list[int] = []
    fast = _read_json(base / "tokenizer.json")
    if isinstance(fast, dict):
        model = fast.get("model") if isinstance(fast.get("model"), dict) else {}
        vocab = model.get("vocab")
        ids += [len(vocab) - 1] if isinstance(vocab, list) and vocab else _int_values(vocab)
        added = fast.get("added_tokens") if isinstance(fast.get("added_tokens"), list) else []
        ids += _int_values({i: token.get("id") for i, token in enumerate(added) if isinstance(token, dict)})
    else:
        ids += _vocab_txt_ids(base / "vocab.txt") or _int_values(_read_json(base / "vocab.json"))
    if not ids:
        return None
    ids += _int_values(_read_json(base / "added_tokens.json"))
    config = _read_json(base / "tokenizer_config.json")
    decoder = config.get("added_tokens_decoder") if isinstance(config, dict) else None
    ids += [int(key) for key in (decoder if isinstance(decoder, dict) else {}) if str(key).isdigit()]
    return max(ids) + 1


def _local_config(name: str | None) -> tuple[dict, Path] | None:
    """``(config.json, directory)`` of a local model directory, or None (a hub name, or unreadable)."""
    if not name or not looks_local(name):
        return None
    try:
        directory = Path(expand("path", name))
    except PathProblem:
        return None
    if not probe(str(directory / "config.json"), "file"):
        return None
    config = _read_json(directory / "config.json")
    return (config, directory) if isinstance(config, dict) else None


def local_teacher_problems(spec: RunSpec) -> list[str]:
    """:func:`teacher_fit_problems` and :func:`model_fit_problems` for a local teacher directory
    (and a local ``student.path``) whose ``config.json`` is readable.

    Nothing for a hub name or an unreadable config (the runs check those before building anything).
    """
    problems = []
    teacher = _local_config(spec.teacher.path)
    token_ids = tokenizer_id_count(teacher[1]) if teacher is not None else None
    if teacher is not None:
        where = f"teacher.path {spec.teacher.path}"
        problems += teacher_fit_problems(spec, teacher[0], where)
        problems += model_fit_problems(spec, teacher[0], token_ids, "teacher.path", where)
    student = _local_config(spec.student.path) if spec.student.init == "path" else None
    if student is not None:
        problems += model_fit_problems(
            spec, student[0], token_ids, "student.path", f"student.path {spec.student.path}"
        )
    return problems
