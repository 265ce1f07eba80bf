"""TinyBERT-style data augmentation for task distillation (paper §6, the augmentation row).

TinyBERT enlarges each task's training set by word replacement: for every example it writes the
original plus ``n`` variants; in each variant every eligible word is, with probability ``p``,
replaced by one of its ``k`` candidates. Candidates of a word that is a single WordPiece are the
masked LM's top-``k`` predictions at that position when the word is masked; candidates of a
multi-piece word come from a :class:`~mlkd_scale.data.augment.neighbours.WordNeighbours` backend
(GloVe in TinyBERT). Eligible words are alphabetic and not stop words.

Kept from TinyBERT's ``data_augmentation.py``:

* the masked LM sees ``[CLS] sentence-with-[MASK] [SEP] original sentence [SEP]`` (segment B is
  the unmasked sentence), so predictions stay close to the original word; continuation pieces
  (``##x``) are dropped from the top-``k`` (so fewer than ``k`` may remain), the original word is
  not removed (choosing it leaves the word as it was);
* sentence pairs: each side is augmented on its own with the other side kept, ``n`` variants per
  side, so a pair yields ``1 + 2n`` rows (TinyBERT's loop leaves side A at its *last* variant while
  it augments side B, an accident of mutating the row; here side B's variants keep the original A).

Deviations (documented, each for a reason):

* ``p=0`` gives ``n`` copies of the original: variants are not de-duplicated unless ``dedup=True``
  (TinyBERT drops a variant equal to an earlier one, so examples get uneven weights);
* replacements are spliced into the original text (case adapted: ``The`` -> ``A``) instead of
  re-joining lower-cased basic tokens with spaces, so untouched text keeps its form;
* special and ``[unusedN]`` tokens are never candidates;
* all masked positions of a sentence run in one batched forward, with the same rows TinyBERT
  feeds one at a time; only the masked positions go through the LM head;
* the random draws come from a local RNG seeded from ``(seed, example_id)``, so the variants of an
  example do not depend on rank, world size, order or resumption;
* multi-piece words use GloVe only with ``--glove``; the default backend is the masked LM's input
  embeddings (see :mod:`~mlkd_scale.data.augment.neighbours`).

The sharded, resumable on-disk runner lives in :mod:`~mlkd_scale.data.augment.cache`; this module
re-exports it, so ``from mlkd_scale.data.augment.augmenter import ...`` is the whole public API.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections import OrderedDict
from dataclasses import dataclass

import torch

from mlkd_scale.data.augment.cache import AugmentCacheError, augment_dataset, iter_augmented, load_augmented
from mlkd_scale.data.augment.neighbours import EmbeddingNeighbours, GloveNeighbours, WordNeighbours

__all__ = [
    "STOPWORDS",
    "AugmentCacheError",
    "Augmenter",
    "EmbeddingNeighbours",
    "GloveNeighbours",
    "WordNeighbours",
    "augment_dataset",
    "iter_augmented",
    "load_augmented",
]

# TinyBERT's stop words (NLTK's English list without the wh-words), alphabetic entries only: its
# other entries contain an apostrophe and can never be a whole word after BERT's pre-tokenizer.
STOPWORDS = frozenset("""
a about above after again against ain all am an and any are aren as at be because been before being
below between both but by can couldn d did didn do does doesn doing don down during each few for
from further had hadn has hasn have haven having he her here hers herself him himself his i if in
into is isn it its itself just ll m ma me mightn more most mustn my myself needn no nor not now o of
off on once only or other our ours ourselves out over own re s same shan she should shouldn so some
such t than that the their theirs them themselves then there these they this those through to too
under until up ve very was wasn we were weren while will with won wouldn y you your yours yourself
yourselves
""".split())  # noqa: SIM905 (a word list reads better)

_ALPHA = re.compile(r"[a-z]+")


@dataclass(frozen=True)
class Word:
    """One pre-tokenized word: its character span in the text and its WordPiece positions."""

    start: int
    end: int
    pieces: tuple[int, ...]
    key: str  # the tokenizer-normalised form (lower-cased, accents stripped for uncased models)


def _example_rng(seed: int, example_id) -> random.Random:
    """A local RNG that depends only on (seed, example_id): not on rank, order or process."""
    digest = hashlib.sha256(f"{seed}\x00{example_id}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _match_case(original: str, word: str) -> str:
    if len(original) > 1 and original.isupper():
        return word.upper()
    if original[:1].isupper():
        return word[:1].upper() + word[1:]
    return word


def _splice(text: str, replacements: list[tuple[int, int, str]]) -> str:
    parts, last = [], 0
    for start, end, word in replacements:
        parts += [text[last:start], word]
        last = end
    return "".join(parts) + text[last:]


class Augmenter:
    """Generates the TinyBERT variants of one example; see the module docstring for the algorithm.

    ``max_seq_length`` caps the masked LM's input (default: the model's position limit, at most
    512). The unmasked copy is truncated first; a word whose piece falls outside the masked copy
    gets no candidates (TinyBERT skips positions past 512 the same way).
    """

    def __init__(self, mlm_model, tokenizer, neighbours: WordNeighbours, p: float = 0.4, k: int = 15,
                 n: int = 20, seed: int = 42, max_seq_length: int | None = None, dedup: bool = False,
                 batch_size: int = 32, cache_size: int = 4096):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        if k < 1 or n < 0 or batch_size < 1:
            raise ValueError(f"need k >= 1, n >= 0, batch_size >= 1; got k={k}, n={n}, batch_size={batch_size}")
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("the augmenter needs a fast tokenizer (character offsets of each word)")
        self.model = mlm_model.eval()
        self.tokenizer = tokenizer
        self.neighbours = neighbours
        self.p, self.k, self.n, self.seed, self.dedup = p, k, n, seed, dedup
        self.batch_size = batch_size
        limit = min(512, getattr(mlm_model.config, "max_position_embeddings", 512))
        self.max_seq_length = min(max_seq_length or limit, limit)
        if self.max_seq_length < 4:
            raise ValueError(f"max_seq_length must be at least 4, got {self.max_seq_length}")
        self._two_segments = getattr(mlm_model.config, "type_vocab_size", 2) >= 2
        self._head = getattr(mlm_model, "cls", None) or getattr(mlm_model, "lm_head", None)
        normalizer = tokenizer.backend_tokenizer.normalizer
        self._normalize = normalizer.normalize_str if normalizer is not None else (lambda s: s)
        tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        self._banned = {i for i, t in enumerate(tokens)
                        if t is None or t.startswith("##") or (t.startswith("[") and t.endswith("]"))}
        self._banned |= set(tokenizer.all_special_ids)
        self._cache: OrderedDict[str, list[tuple[Word, list[str]]]] = OrderedDict()
        self._cache_size = cache_size

    # ------------------------------------------------------------------ public
    def settings(self) -> dict:
        """What determines the output; recorded in the cache so a resume cannot mix settings."""
        model_path = getattr(self.model, "name_or_path", "") or getattr(self.model.config, "_name_or_path", "")
        return {
            "algorithm": "tinybert-word-replacement/1",
            "p": self.p, "k": self.k, "n": self.n, "seed": self.seed, "dedup": self.dedup,
            "max_seq_length": self.max_seq_length, "model": str(model_path),
            "neighbours": self.neighbours.describe(),
        }

    def augment(self, example_id, text_a: str, text_b: str | None = None) -> list[dict]:
        """Variant 0 is the original; then ``n`` variants of ``text_a`` (and ``n`` of ``text_b``).

        Each row: ``variant`` (0, 1, ...), ``augmented`` (``None``, ``"a"`` or ``"b"``), ``text_a``
        and, for pairs, ``text_b``. The result depends only on (settings, example_id, texts).
        """
        rng = _example_rng(self.seed, example_id)
        pairs = [(text_a, text_b, None)]
        pairs += [(v, text_b, "a") for v in self._variants(rng, text_a)]
        if text_b is not None:
            pairs += [(text_a, v, "b") for v in self._variants(rng, text_b)]
        rows, seen = [], set()
        for a, b, side in pairs:
            if self.dedup and (a, b) in seen:
                continue
            seen.add((a, b))
            row = {"variant": len(rows), "augmented": side, "text_a": a}
            if text_b is not None:
                row["text_b"] = b
            rows.append(row)
        return rows

    def candidates(self, text: str) -> list[tuple[Word, list[str]]]:
        """Each eligible word of ``text`` with its replacement candidates (memoised per text)."""
        if text in self._cache:
            self._cache.move_to_end(text)
            return self._cache[text]
        ids, words = self.split_words(text)
        eligible = [w for w in words if _ALPHA.fullmatch(w.key.lower()) and w.key.lower() not in STOPWORDS]
        single = [w for w in eligible if len(w.pieces) == 1]
        predicted = dict(zip(single, self._mlm_candidates(ids, [w.pieces[0] for w in single])))
        result = [(w, predicted[w] if w in predicted else self.neighbours.neighbours(w.key, self.k))
                  for w in eligible]
        self._cache[text] = result
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return result

    def split_words(self, text: str) -> tuple[list[int], list[Word]]:
        """WordPiece ids of ``text`` and its pre-tokenized words (BERT: whitespace + punctuation)."""
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        groups: dict[int, list[int]] = {}
        for position, word_id in enumerate(enc.word_ids()):
            if word_id is not None:
                groups.setdefault(word_id, []).append(position)
        offsets = enc["offset_mapping"]
        words = []
        for positions in groups.values():
            start, end = offsets[positions[0]][0], offsets[positions[-1]][1]
            words.append(Word(start, end, tuple(positions), self._normalize(text[start:end])))
        return list(enc["input_ids"]), words

    # ----------------------------------------------------------------- private
    def _variants(self, rng: random.Random, text: str) -> list[str]:
        slots = self.candidates(text)
        variants = []
        for _ in range(self.n):
            replacements = []
            for word, options in slots:
                choice = rng.choice(options) if options else None
                if rng.random() < self.p and choice is not None and choice != word.key:
                    replacements.append((word.start, word.end, _match_case(text[word.start:word.end], choice)))
            variants.append(_splice(text, replacements))
        return variants

    @torch.no_grad()
    def _mlm_candidates(self, ids: list[int], positions: list[int]) -> list[list[str]]:
        """Top-k words at each position when it alone is masked; one batched forward per chunk."""
        if not positions:
            return []
        tok = self.tokenizer
        first = ids[: self.max_seq_length - 2]
        room = self.max_seq_length - 2 - len(first)
        second = ids[: room - 1] if room >= 2 else []
        row = [tok.cls_token_id, *first, tok.sep_token_id] + ([*second, tok.sep_token_id] if second else [])
        types = [0] * (len(first) + 2) + [1 if self._two_segments else 0] * (len(row) - len(first) - 2)
        inside = [p for p in positions if p < len(first)]
        found: dict[int, list[str]] = {}
        device = next(self.model.parameters()).device
        for i in range(0, len(inside), self.batch_size):
            chunk = inside[i: i + self.batch_size]
            input_ids = torch.tensor([row] * len(chunk), device=device)
            at = torch.tensor([p + 1 for p in chunk], device=device)
            input_ids[torch.arange(len(chunk), device=device), at] = tok.mask_token_id
            token_types = torch.tensor([types] * len(chunk), device=device)
            top = self._mask_logits(input_ids, token_types, at).topk(self.k, dim=-1).indices.tolist()
            for p, ids_k in zip(chunk, top):
                found[p] = tok.convert_ids_to_tokens([t for t in ids_k if t not in self._banned])
        return [found.get(p, []) for p in positions]

    def _mask_logits(self, input_ids, token_types, at):
        """Vocabulary logits at the masked positions only ([B, V]), not at every position."""
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "token_type_ids": token_types}
        if self._head is not None:
            hidden = self.model.base_model(**inputs).last_hidden_state
            return self._head(hidden[rows, at]).float()
        return self.model(**inputs).logits[rows, at].float()
