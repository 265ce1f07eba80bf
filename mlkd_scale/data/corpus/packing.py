"""Tokenize documents and pack them into full sequences of exactly ``max_seq_length`` tokens.

General distillation wastes no compute on padding: every sequence is ``[CLS] body [SEP]`` with a
body of ``max_seq_length - 2`` tokens cut from the concatenated documents, a ``[SEP]`` between two
documents inside the body, and the rest of a document that does not fit carried over to the next
sequence. A sample's ``doc_ids`` names the documents whose *first* token lies in it, so every
document is attributed to exactly one sequence, which lets tests prove none is lost or repeated.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import torch

SAMPLE_KEYS = ("input_ids", "attention_mask", "token_type_ids", "doc_ids")

#: Texts longer than this (characters) are encoded in pieces of about this size.
LONG_TEXT = 1 << 15
_CUT = re.compile(r"(?<=\S) ")  # a space right after a non-space: a word boundary for every pre-tokenizer
_PROBE = "Packing cuts long texts, e.g. at 1,000 places:  here; there\tand  everywhere. \u00dcml\u00e4ut \u6f22\u5b57 ok"


def _pieces(text: str, size: int) -> Iterator[str]:
    """``text`` cut before a space that follows a non-space, into pieces of at least ``size`` chars.

    Each cut keeps the space with the word after it, so WordPiece (whitespace is dropped),
    byte-level BPE (the space is part of the next token) and Metaspace see the same words as in
    the whole text. Runs of spaces are never split. A text without such a space stays whole.
    """
    start = 0
    while len(text) - start > size:
        cut = _CUT.search(text, start + size)
        if cut is None:
            break
        yield text[start : cut.start()]
        start = cut.start()
    yield text[start:]


def make_encoder(tokenizer) -> Callable[[str], list[int]]:
    """``text -> token ids`` without special tokens, truncation, padding or length warnings.

    Fast tokenizers get a private copy of their Rust backend with truncation and padding switched
    off (a ``tokenizer.json`` may ship with both on, e.g. ``max_length=128``), so a long document is
    tokenized whole and cut by the packer. Slow tokenizers go through ``tokenize``, which does not
    warn about the model's maximum length.

    A very long text (over :data:`LONG_TEXT` characters, e.g. a 5 MB single-line document) is
    encoded piece by piece (see :func:`_pieces`): the Rust backend slows down superlinearly on one
    huge input (measured: 5 MB took 10-17 s whole, 5 s in 16K-char pieces) and holds offsets for
    every token. The pieces give exactly the whole text's ids; that is checked once per tokenizer
    on a probe sentence, and a tokenizer whose output would differ (a normalizer that strips
    edges, say) always encodes whole. Pieces are encoded one after the other, not with
    ``encode_batch``, whose thread pool makes ``tokenizers`` warn in every later fork.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        from tokenizers import Tokenizer

        own = Tokenizer.from_str(backend.to_str())
        own.no_truncation()
        own.no_padding()

        def whole(text: str) -> list[int]:
            return own.encode(text, add_special_tokens=False).ids

        pieced_ok = whole(_PROBE) == [i for piece in _pieces(_PROBE, 1) for i in whole(piece)]

        def encode(text: str) -> list[int]:
            if len(text) <= LONG_TEXT or not pieced_ok:
                return whole(text)
            ids: list[int] = []
            for piece in _pieces(text, LONG_TEXT):
                ids.extend(whole(piece))
            return ids

        return encode
    return lambda text: tokenizer.convert_tokens_to_ids(tokenizer.tokenize(text))


class Packer:
    """Accumulates tokenized documents and cuts full sequences from the front.

    ``tokens[pos:]`` is the carried-over body text not yet emitted; ``starts`` holds
    ``(doc id, offset into tokens)`` for the documents whose first token is still in it.
    """

    def __init__(self, tokenizer, max_seq_length: int):
        if max_seq_length < 3:
            raise ValueError(
                f"max_seq_length must be at least 3 to hold [CLS], a token and [SEP], got {max_seq_length}"
            )
        self.cls_id, self.sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
        if self.cls_id is None or self.sep_id is None:
            raise ValueError(
                "the teacher's tokenizer has no [CLS]/[SEP] token (cls_token/sep_token); packing needs both"
            )
        self.max_seq_length = max_seq_length
        self.body = max_seq_length - 2
        self.encode = make_encoder(tokenizer)
        self.tokens: list[int] = []
        self.pos = 0
        self.starts: list[tuple[str, int]] = []

    def __len__(self) -> int:
        """Tokens waiting to be packed."""
        return len(self.tokens) - self.pos

    def add(self, doc_id: str, text: str) -> bool:
        """Tokenize and append one document; False (nothing added) if it has no tokens.

        A document that would start a sequence gets no leading ``[SEP]`` (the previous sequence's
        closing ``[SEP]`` already separates them), so the output depends only on the documents,
        not on when :meth:`pop` is called.
        """
        return self.add_ids(doc_id, self.encode(text))

    def add_ids(self, doc_id, ids: list[int]) -> bool:
        """:meth:`add` for a document tokenized elsewhere (e.g. by a worker process)."""
        if not ids:
            return False
        if len(self) % self.body:  # not at a sequence start: separate from the previous document
            self.tokens.append(self.sep_id)
        self.starts.append((doc_id, len(self.tokens)))
        self.tokens.extend(ids)
        return True

    def ready(self) -> bool:
        """Whether a full sequence can be cut."""
        return len(self) >= self.body

    def pop(self) -> dict:
        """Cut the next full sequence (call only when :meth:`ready`)."""
        if not self.ready():
            raise RuntimeError("Packer.pop() called before a full sequence was buffered")
        end = self.pos + self.body
        body = self.tokens[self.pos : end]
        n_docs = 0
        while n_docs < len(self.starts) and self.starts[n_docs][1] < end:
            n_docs += 1
        doc_ids = [doc_id for doc_id, _ in self.starts[:n_docs]]
        del self.starts[:n_docs]
        self.pos = end
        if self.pos > 4096 and self.pos * 2 > len(self.tokens):  # compact now and then, not per pop
            self._compact()
        L = self.max_seq_length
        return {
            "input_ids": torch.tensor([self.cls_id, *body, self.sep_id], dtype=torch.long),
            "attention_mask": torch.ones(L, dtype=torch.long),
            "token_type_ids": torch.zeros(L, dtype=torch.long),
            "doc_ids": doc_ids,
        }

    def _compact(self) -> None:
        shift = self.pos
        self.tokens = self.tokens[shift:]
        self.starts = [(d, o - shift) for d, o in self.starts]
        self.pos = 0

    def state_dict(self) -> dict:
        """The carried-over tokens and the documents starting in them (plain lists, a copy)."""
        return {
            "tokens": self.tokens[self.pos :],
            "starts": [[d, o - self.pos] for d, o in self.starts],
        }

    def load_state_dict(self, state: dict) -> None:
        self.tokens = [int(t) for t in state["tokens"]]
        self.starts = [(str(d), int(o)) for d, o in state["starts"]]
        self.pos = 0


def collate(samples: list[dict]) -> dict:
    """Stack packed samples into ``[B, L]`` tensors; ``doc_ids`` stays a list of lists."""
    batch = {k: torch.stack([s[k] for s in samples]) for k in SAMPLE_KEYS if k != "doc_ids"}
    batch["doc_ids"] = [s["doc_ids"] for s in samples]
    return batch
