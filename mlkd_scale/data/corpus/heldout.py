"""Documents held out of general distillation for evaluation: the same ones at any world size.

A document is held out when a hash of ``(run.seed, its id)`` falls below ``data.heldout_fraction``
(:func:`is_heldout`). The stream skips those documents (counted as ``documents_heldout``) on every
rank; :func:`heldout_texts` reads the corpus in its own order, as one rank of one, and keeps the
first ``limit`` of them. Ids of local sources are ``source:file:row``, fixed whatever the world
size, so the held-out set and the training set never meet, before or after a resume at another
world size. (A hub source without an ``id`` column gets per-rank running ids: its held-out set is
then not stable across world sizes; give it an id column.)
"""

from __future__ import annotations

import hashlib

from mlkd_scale.data.corpus.sources import count_record, open_corpus


def is_heldout(doc_id: str, seed: int, fraction: float) -> bool:
    """Whether document ``doc_id`` is held out (never trained on) for this seed and fraction."""
    if fraction <= 0:
        return False
    digest = hashlib.blake2b(f"{seed}/{doc_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


def heldout_texts(data_spec, seed: int, limit: int) -> list[tuple[str, str]]:
    """``(id, text)`` of the first ``limit`` held-out documents in corpus order (one pass at most)."""
    counters = {"documents_read": 0, "documents_skipped": 0, "documents_malformed": 0}
    found = []
    for record in open_corpus(data_spec, rank=0, world_size=1, seed=seed):
        text = count_record(record, counters)
        if text is not None and is_heldout(record["id"], seed, data_spec.heldout_fraction):
            found.append((record["id"], text))
            if len(found) == limit:
                break
    return found
