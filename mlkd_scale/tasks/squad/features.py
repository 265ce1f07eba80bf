"""SQuAD examples -> fixed-length model features, with the semantics of Hugging Face ``run_qa.py``.

A question and its paragraph are encoded as ``[CLS] question [SEP] context [SEP]`` by a *fast*
tokenizer (character offsets are needed to map answers to tokens and back). A paragraph longer
than one window is cut into several overlapping windows (``return_overflowing_tokens``); each
window is one *feature*, and ``doc_stride`` is the number of context tokens two consecutive windows
share (the tokenizer's ``stride``, as in ``run_qa.py``; the original BERT ``run_squad.py`` used the
same name for the step between window starts). Every feature is padded to ``max_length``.

Train features label the answer's first and last token; a window that does not contain the whole
answer, and an unanswerable question, point both labels at [CLS] (index 0), which is what the
null score of post-processing reads. Eval features keep, per token, the character span in the
context (``None`` for question, special and padding tokens), so predicted token spans become
answer text, and the id of the example each feature came from, so windows can be regrouped.

Returned as a dict: tensors (``input_ids``, ``attention_mask``, ``token_type_ids`` when the
tokenizer makes them, and ``start_positions``/``end_positions`` for train) ready for
``model(**batch)``, plus metadata (``example_index``, ``example_id``, ``offset_mapping``) and
``context_mask`` (BoolTensor [F, max_length]: True on the window's context tokens, the positions an
answer can start or end at; task distillation restricts the start/end distributions to them).

One deliberate difference from ``run_qa.py``: its token walk for the answer start can run past the
last context token into [SEP]/padding when the answer begins in the window's last context token;
here the search stays inside the window's context tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from mlkd_scale.tasks.squad.examples import SquadDataError, SquadExample

CLS_INDEX = 0  # [CLS] is the first token with right padding; post-processing reads the null score there
TENSOR_KEYS = ("input_ids", "attention_mask", "token_type_ids", "start_positions", "end_positions")


def _check_tokenizer(tokenizer, examples: Sequence[SquadExample], max_length: int, doc_stride: int) -> None:
    """Fail early, naming the example, where the tokenizer would fail obscurely (or panic)."""
    if not getattr(tokenizer, "is_fast", False):
        raise SquadDataError(
            f"SQuAD features need a fast tokenizer (character offsets); {type(tokenizer).__name__} is "
            "not one: load it with AutoTokenizer.from_pretrained(..., use_fast=True)"
        )
    if tokenizer.padding_side != "right":
        raise SquadDataError(
            "SQuAD features put the question first and need tokenizer.padding_side == 'right' "
            f"(got {tokenizer.padding_side!r})"
        )
    if not 0 <= doc_stride < max_length:
        raise SquadDataError(f"doc_stride must be in [0, max_length={max_length}), got {doc_stride}")
    specials = tokenizer.num_special_tokens_to_add(pair=True)
    questions = [e.question.lstrip() for e in examples]
    lengths = [len(ids) for ids in tokenizer(questions, add_special_tokens=False)["input_ids"]]
    for example, q_len in zip(examples, lengths):
        room = max_length - specials - q_len  # context tokens per window
        if room <= doc_stride:
            raise SquadDataError(
                f"question {example.id!r} takes {q_len} tokens, leaving {room} context tokens per "
                f"window with max_length={max_length}, which must exceed doc_stride={doc_stride}; "
                "raise max_length or lower doc_stride"
            )


def _encode(examples: Sequence[SquadExample], tokenizer, max_length: int, doc_stride: int, batch_size: int):
    """Tokenize in batches (bounded memory), yielding (batch start, encoding) with numpy arrays."""
    for lo in range(0, len(examples), batch_size):
        batch = examples[lo : lo + batch_size]
        enc = tokenizer(
            # leading whitespace in a few official questions only eats the context budget
            [e.question.lstrip() for e in batch],
            [e.context for e in batch],
            truncation="only_second",
            max_length=max_length,
            stride=doc_stride,
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
            padding="max_length",
            return_tensors="np",
        )
        yield lo, enc


def _answer_tokens(offsets: np.ndarray, sequence_ids: list, example: SquadExample) -> tuple[int, int]:
    """Token indices of the first gold answer inside the window, or [CLS] twice if it is not inside."""
    if example.is_impossible or 1 not in sequence_ids:
        return CLS_INDEX, CLS_INDEX
    first = sequence_ids.index(1)  # the window's context (sequence 1) tokens are first..last
    last = len(sequence_ids) - 1 - sequence_ids[::-1].index(1)
    answer = example.answers[0]
    ctx = offsets[first : last + 1]
    if not (ctx[0, 0] <= answer.start and ctx[-1, 1] >= answer.end):
        return CLS_INDEX, CLS_INDEX
    start = first + int(np.nonzero(ctx[:, 0] <= answer.start)[0][-1])  # last token starting at/before it
    end = first + int(np.nonzero(ctx[:, 1] >= answer.end)[0][0])  # first token ending at/after it
    return start, end


def _features(examples, tokenizer, max_length, doc_stride, batch_size, train: bool) -> dict:
    examples = list(examples)
    if not examples:
        raise SquadDataError("no SQuAD examples to build features from; check the data source and split")
    _check_tokenizer(tokenizer, examples, max_length, doc_stride)
    columns: dict[str, list] = {k: [] for k in TENSOR_KEYS}
    example_index: list[int] = []
    context_mask: list[list[bool]] = []
    offset_mapping: list[list[tuple[int, int] | None]] = []
    for lo, enc in _encode(examples, tokenizer, max_length, doc_stride, batch_size):
        for key in ("input_ids", "attention_mask", "token_type_ids"):
            if key in enc:
                columns[key].append(torch.from_numpy(enc[key].astype(np.int64)))
        offsets_all = enc["offset_mapping"]
        for i, sample in enumerate(enc["overflow_to_sample_mapping"].tolist()):
            example = examples[lo + sample]
            example_index.append(lo + sample)
            sequence_ids = enc.sequence_ids(i)
            context_mask.append([s == 1 for s in sequence_ids])
            if train:
                start, end = _answer_tokens(offsets_all[i], sequence_ids, example)
                columns["start_positions"].append(start)
                columns["end_positions"].append(end)
            else:
                offset_mapping.append(
                    [
                        (o[0], o[1]) if s == 1 else None
                        for s, o in zip(sequence_ids, offsets_all[i].tolist())
                    ]
                )
    features: dict = {}
    for key, parts in columns.items():
        if key in ("start_positions", "end_positions"):
            if train:
                features[key] = torch.tensor(parts, dtype=torch.long)
        elif parts:
            features[key] = torch.cat(parts)
    features["context_mask"] = torch.tensor(context_mask, dtype=torch.bool)
    features["example_index"] = torch.tensor(example_index, dtype=torch.long)
    features["example_id"] = [examples[j].id for j in example_index]
    if not train:
        features["offset_mapping"] = offset_mapping
    return features


def prepare_train_features(
    examples: Sequence[SquadExample],
    tokenizer,
    max_length: int = 384,
    doc_stride: int = 128,
    batch_size: int = 1000,
) -> dict:
    """Training features: one per window, labelled with the answer's token span ([CLS] when absent).

    Keys: ``input_ids``, ``attention_mask``, ``token_type_ids`` (if the tokenizer has them),
    ``start_positions``, ``end_positions`` (LongTensor [F, max_length] / [F]), ``example_index``
    (LongTensor [F], position of the feature's example in ``examples``), ``example_id`` (list[str]),
    ``context_mask`` (BoolTensor [F, max_length], True on context tokens).
    """
    return _features(examples, tokenizer, max_length, doc_stride, batch_size, train=True)


def prepare_eval_features(
    examples: Sequence[SquadExample],
    tokenizer,
    max_length: int = 384,
    doc_stride: int = 128,
    batch_size: int = 1000,
) -> dict:
    """Evaluation features: one per window, with what post-processing needs to map logits to text.

    Keys: ``input_ids``, ``attention_mask``, ``token_type_ids`` (if the tokenizer has them)
    (LongTensor [F, max_length]), ``example_index`` (LongTensor [F]), ``example_id`` (list[str]),
    ``context_mask`` (BoolTensor [F, max_length]), ``offset_mapping`` (list of F lists of max_length ``(char_start, char_end)`` into the context,
    ``None`` for every token that is not context).
    """
    return _features(examples, tokenizer, max_length, doc_stride, batch_size, train=False)


def model_inputs(features: dict) -> dict[str, torch.Tensor]:
    """The tensor part of a features dict (what ``model(**inputs)`` and a TensorDataset take)."""
    return {k: v for k, v in features.items() if k in TENSOR_KEYS}
