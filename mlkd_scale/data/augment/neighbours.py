"""Nearest-neighbour words for words the masked LM cannot predict in one slot.

TinyBERT replaces a word that the WordPiece vocabulary splits into several pieces by one of its
GloVe nearest neighbours (cosine similarity, the word itself excluded), because a masked LM
predicts one piece per ``[MASK]`` and so cannot propose a whole multi-piece word. Two backends
share the :class:`WordNeighbours` interface:

* :class:`GloveNeighbours`: TinyBERT's own path, from a GloVe text file (``--glove``).
* :class:`EmbeddingNeighbours`: the offline default (a deviation from TinyBERT): the query is the
  mean of the word's piece vectors in the masked LM's input-embedding matrix, and candidates are
  the whole-word vocabulary entries nearest to it. Weaker than GloVe (piece embeddings are not
  trained to compose), but it needs no download and keeps the augmentation well defined.

Both return at most ``k`` words, best first, and the same list for the same word every time (a
stable sort breaks ties), which the cache's determinism relies on.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

_WHOLE_WORD = re.compile(r"[A-Za-z]+")


class WordNeighbours:
    """Interface: ``neighbours(word, k)`` -> up to ``k`` replacement words, best first.

    ``describe()`` returns the JSON-able identity of the backend, recorded in the cache's
    ``settings.json`` so that a resume with another backend is refused.
    """

    def __init__(self) -> None:
        self._cache: dict[tuple[str, int], list[str]] = {}

    def neighbours(self, word: str, k: int) -> list[str]:
        key = (word, k)
        if key not in self._cache:
            self._cache[key] = self._lookup(word, k)
        return list(self._cache[key])

    def _lookup(self, word: str, k: int) -> list[str]:
        raise NotImplementedError

    def describe(self) -> dict:
        raise NotImplementedError


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest scores, best first, ties broken by index (deterministic)."""
    return np.argsort(-scores, kind="stable")[:k]


class GloveNeighbours(WordNeighbours):
    """Cosine nearest neighbours in a GloVe text file (``word v1 v2 ...`` per line).

    Like TinyBERT only the first ``vocab_size`` lines are read (GloVe files are frequency-sorted, so
    this keeps the common words and makes each lookup a fast matrix-vector product).
    """

    def __init__(self, path: str | Path, vocab_size: int = 100_000):
        super().__init__()
        self.path = Path(path).resolve()
        self.vocab_size = vocab_size
        words, vectors = [], []
        dim = None
        with self.path.open(encoding="utf-8") as f:
            for line in f:
                items = line.rstrip("\n").rstrip().split(" ")
                if len(items) < 2:
                    continue
                if dim is None:
                    dim = len(items) - 1
                if len(items) < dim + 1:
                    continue  # a malformed line; GloVe 840B has a few
                words.append(" ".join(items[:-dim]))  # 840B has tokens that contain spaces
                vectors.append(np.asarray(items[-dim:], dtype=np.float32))
                if len(words) == vocab_size:
                    break
        if not words:
            raise ValueError(f"{self.path} holds no GloVe vectors; pass a GloVe .txt file to --glove")
        matrix = np.stack(vectors)
        norms = np.linalg.norm(matrix, axis=1, keepdims=True)
        self._matrix = matrix / np.maximum(norms, 1e-12)
        self._words = words
        self._index = {w: i for i, w in enumerate(words)}

    def _lookup(self, word: str, k: int) -> list[str]:
        i = self._index.get(word)
        if i is None:
            return []
        scores = self._matrix @ self._matrix[i]
        scores[i] = -np.inf
        return [self._words[j] for j in _top_k(scores, k)]

    def describe(self) -> dict:
        return {"backend": "glove", "path": str(self.path), "vocab_size": self.vocab_size}


class EmbeddingNeighbours(WordNeighbours):
    """Nearest whole-word vocabulary entries to the mean of a word's piece input embeddings.

    Whole-word entries are alphabetic tokens that are neither continuation pieces (``##x``) nor
    special/unused tokens (``[...]``): these are the only entries that read as a word in place.
    """

    def __init__(self, mlm_model: torch.nn.Module, tokenizer):
        super().__init__()
        self.tokenizer = tokenizer
        weight = mlm_model.get_input_embeddings().weight.detach().float().cpu().numpy()
        tokens = tokenizer.convert_ids_to_tokens(list(range(weight.shape[0])))
        keep = [i for i, t in enumerate(tokens) if t and _WHOLE_WORD.fullmatch(t)]
        self._embedding = weight
        candidates = weight[keep]
        norms = np.linalg.norm(candidates, axis=1, keepdims=True)
        self._candidates = candidates / np.maximum(norms, 1e-12)
        self._words = [tokens[i] for i in keep]
        self._index = {w: i for i, w in enumerate(self._words)}

    def _lookup(self, word: str, k: int) -> list[str]:
        ids = self.tokenizer(word, add_special_tokens=False)["input_ids"]
        if not ids:
            return []
        query = self._embedding[ids].mean(axis=0)
        query = query / max(float(np.linalg.norm(query)), 1e-12)
        scores = self._candidates @ query
        if word in self._index:
            scores[self._index[word]] = -np.inf
        return [self._words[j] for j in _top_k(scores, k)]

    def describe(self) -> dict:
        return {"backend": "mlm-input-embeddings"}
