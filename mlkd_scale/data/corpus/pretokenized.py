"""Pre-tokenized corpora: tokenize and pack once with many processes, then train at memory speed.

Why: a GPU step of a BERT-base teacher and a small student eats on the order of a million tokens
per second per device, while tokenizing on the fly (``PackedStream``) delivers about 100 thousand
per CPU core (WordPiece, measured on this project's 2-core machine). ``mlkd-scale pretokenize``
runs the same pipeline as streaming (sources → interleave → skip empty/malformed → tokenize →
pack into full ``[CLS] … [SEP]`` sequences) once, tokenizing in worker processes, and writes:

    <dir>/input_ids.bin     [N, L] uint16 (uint32 for vocabularies over 65,535), row-major, raw
    <dir>/doc_offsets.bin   [N + 1] int64: sequence i holds documents doc_offsets[i]:doc_offsets[i+1]
    <dir>/doc_ids.txt       one line per document that starts in a sequence, in order (the source id)
    <dir>/doc_id_bytes.bin  [D + 1] int64: line j of doc_ids.txt is bytes doc_id_bytes[j]:doc_id_bytes[j+1]
    <dir>/meta.json         format, shapes, dtype, tokenizer fingerprint, sources, counters

``meta.json`` is written last and the directory is renamed into place, so a directory with a
``meta.json`` is complete; an interrupted ``pretokenize`` leaves only a hidden temp directory and
is simply run again.

Training (``data.pretokenized_dir``) reads it with :class:`PretokenizedStream`: every epoch is a
seeded permutation of all N sequences (a global shuffle, no buffer), cut into consecutive global
batches; rank r of W takes the r-th slice of each. The position is one number, the count of
sequences consumed by all ranks together, so a checkpoint resumes exactly at *any* world size.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from mlkd_scale.data.corpus.packing import Packer, make_encoder
from mlkd_scale.data.corpus.sources import DataError, count_record, open_corpus, source_label
from mlkd_scale.spec import DataSpec

if TYPE_CHECKING:
    from typing_extensions import Self

FORMAT = 1
META = "meta.json"
STATE_KIND = "pretokenized"
#: Documents per task sent to a worker process.
CHUNK_DOCS = 256


def tokenizer_fingerprint(tokenizer) -> dict:
    """What must not change between pretokenizing and training: the vocabulary and special ids."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    digest = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]
    return {
        "vocab_size": len(vocab),
        "vocab_sha256_16": digest,
        "cls_token_id": tokenizer.cls_token_id,
        "sep_token_id": tokenizer.sep_token_id,
    }


def source_labels(data: DataSpec) -> list[str]:
    return [f"{source_label(s)} (weight {s.weight:g})" for s in data.sources]


# ---------------------------------------------------------------------------- writing

_worker_encode = None


def _init_worker(tokenizer_path: str) -> None:
    global _worker_encode
    from transformers import AutoTokenizer

    _worker_encode = make_encoder(AutoTokenizer.from_pretrained(tokenizer_path))


def _encode_chunk(docs: list[tuple[str, str]]) -> list[tuple[str, list[int]]]:
    return [(doc_id, _worker_encode(text)) for doc_id, text in docs]


def _documents(data: DataSpec, seed: int, counters: dict) -> Iterator[tuple[str, str]]:
    """One pass over the interleaved corpus: (id, text) of every non-empty, well-formed record."""
    for record in open_corpus(data, rank=0, world_size=1, seed=seed):
        text = count_record(record, counters)
        if text is not None:
            yield record["id"], text


class _PackedFiles:
    """The growing ``input_ids.bin`` and ``doc_ids.txt`` of a pretokenized corpus, and the offsets
    that index them (which documents each sequence holds, where each document id starts)."""

    def __init__(self, folder: Path, dtype):
        self.folder, self.dtype = folder, dtype
        self.sequences = 0
        self.offsets, self.id_bytes = [0], [0]

    def __enter__(self) -> Self:
        self.ids_file = open(self.folder / "input_ids.bin", "wb")  # closed by __exit__
        self.doc_file = open(self.folder / "doc_ids.txt", "wb")
        return self

    def __exit__(self, *exc) -> None:
        self.ids_file.close()
        self.doc_file.close()

    def write_ready(self, packer: Packer) -> None:
        """Append every full sequence the packer holds (one write per call)."""
        rows = []
        while packer.ready():
            sample = packer.pop()
            rows.append(sample["input_ids"].numpy())
            for doc_id in sample["doc_ids"]:
                line = f"{doc_id}\n".encode()
                self.doc_file.write(line)
                self.id_bytes.append(self.id_bytes[-1] + len(line))
            self.offsets.append(self.offsets[-1] + len(sample["doc_ids"]))
        if rows:
            np.stack(rows).astype(self.dtype).tofile(self.ids_file)
            self.sequences += len(rows)


def write_pretokenized(
    data: DataSpec, tokenizer_path: str, out_dir: str | Path, seed: int, workers: int
) -> dict:
    """Tokenize and pack one pass over ``data.sources`` into ``out_dir``; return its meta.

    ``workers`` processes tokenize (0 = in this process). Documents are packed in corpus order,
    exactly as :class:`~mlkd_scale.data.corpus.stream.PackedStream` packs them with ``shuffle_buffer=0``.
    Refuses to overwrite a complete directory.
    """
    from transformers import AutoTokenizer

    out_dir = Path(out_dir)
    if (out_dir / META).is_file():
        raise DataError(
            f"{out_dir} already holds a pretokenized corpus ({META}); remove it or choose another --out"
        )
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    packer = Packer(tokenizer, data.max_seq_length)
    dtype = np.uint16 if len(tokenizer.get_vocab()) <= np.iinfo(np.uint16).max + 1 else np.uint32
    counters = dict.fromkeys(
        ["documents_read", "documents_skipped", "documents_malformed", "documents_packed"], 0
    )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    start = time.perf_counter()
    try:
        with _PackedFiles(tmp, dtype) as files:
            docs = _documents(data, seed, counters)
            chunks = iter(lambda: list(itertools.islice(docs, CHUNK_DOCS)), [])
            with _encoder_pool(tokenizer_path, workers) as encode_chunks:
                for encoded in encode_chunks(chunks):
                    for doc_id, ids in encoded:
                        packed = packer.add_ids(doc_id, ids)
                        counters["documents_packed" if packed else "documents_skipped"] += 1
                    files.write_ready(packer)
        sequences, offsets, id_bytes = files.sequences, files.offsets, files.id_bytes
        if sequences == 0:
            raise DataError(
                f"the data sources give no full sequence of {data.max_seq_length} tokens "
                f"({counters['documents_packed']} documents packed); check the paths and text_field"
            )
        np.asarray(offsets, dtype=np.int64).tofile(tmp / "doc_offsets.bin")
        np.asarray(id_bytes, dtype=np.int64).tofile(tmp / "doc_id_bytes.bin")
        meta = {
            "format": FORMAT,
            "num_sequences": sequences,
            "max_seq_length": data.max_seq_length,
            "dtype": np.dtype(dtype).name,
            "num_documents": offsets[-1],
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "sources": source_labels(data),
            "seed": seed,
            "counters": counters,
            "dropped_tail_tokens": len(packer),
            "seconds": round(time.perf_counter() - start, 1),
        }
        (tmp / META).write_text(json.dumps(meta, indent=1) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it private; other users of a shared cluster file system read it
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


class _encoder_pool:
    """``with _encoder_pool(path, n) as encode_chunks``: ``encode_chunks(chunks)`` yields each chunk
    of ``(id, text)`` as ``(id, token ids)`` in order, tokenized by ``n`` processes (0 = here)."""

    def __init__(self, tokenizer_path: str, workers: int):
        self.path, self.workers, self.pool = tokenizer_path, workers, None

    def __enter__(self):
        if self.workers == 0:
            _init_worker(self.path)
            return lambda chunks: map(_encode_chunk, chunks)
        # spawn, not fork: a forked Rust tokenizer thread pool can deadlock.
        self.pool = multiprocessing.get_context("spawn").Pool(self.workers, _init_worker, (self.path,))
        return lambda chunks: self.pool.imap(_encode_chunk, chunks, chunksize=1)

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


# ---------------------------------------------------------------------------- reading


def read_meta(directory: str | Path) -> dict:
    path = Path(directory) / META
    if not path.is_file():
        raise DataError(
            f"data.pretokenized_dir: {directory} is not a finished pretokenized corpus (no {META}); "
            "write it with `mlkd-scale pretokenize SPEC --out DIR`"
        )
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise DataError(
            f"{path}: format {meta.get('format')} but this code reads format {FORMAT}; pretokenize again"
        )
    return meta


class PretokenizedStream:
    """This rank's packed sequences from a pretokenized directory: the interface of
    :class:`~mlkd_scale.data.corpus.stream.PackedStream` (``next_batch``, ``stats``, ``state_dict``).

    ``doc_ids`` in a batch are the source ids (from ``doc_ids.txt``) of the documents that start in
    each sequence, read through a memory map by byte offsets: no rank ever holds the whole id list.
    """

    def __init__(self, data: DataSpec, tokenizer, rank: int, world_size: int, seed: int):
        self.dir = Path(data.pretokenized_dir)
        self.meta = meta = read_meta(self.dir)
        self._check(data, tokenizer)
        self.rank, self.world_size, self.seed = rank, world_size, seed
        n, length = meta["num_sequences"], meta["max_seq_length"]
        self.input_ids = np.memmap(
            self.dir / "input_ids.bin", dtype=meta["dtype"], mode="r", shape=(n, length)
        )
        self.doc_offsets = np.fromfile(self.dir / "doc_offsets.bin", dtype=np.int64)
        self.doc_id_bytes = np.memmap(self.dir / "doc_id_bytes.bin", dtype=np.int64, mode="r")
        self.doc_id_text = np.memmap(self.dir / "doc_ids.txt", dtype=np.uint8, mode="r")
        self.consumed = 0  # sequences taken by all ranks together: the whole position
        self._order_epoch, self._order = -1, None

    def _check(self, data: DataSpec, tokenizer) -> None:
        meta, where = self.meta, f"data.pretokenized_dir {self.dir}"
        if meta["max_seq_length"] != data.max_seq_length:
            raise DataError(
                f"{where} holds sequences of {meta['max_seq_length']} tokens but data.max_seq_length is "
                f"{data.max_seq_length}; set it to {meta['max_seq_length']} or pretokenize again"
            )
        if meta["tokenizer"] != tokenizer_fingerprint(tokenizer):
            raise DataError(
                f"{where} was tokenized with another vocabulary than the teacher's; pretokenize again"
            )
        if meta["sources"] != source_labels(data):
            raise DataError(
                f"{where} was written from the sources {meta['sources']} but data.sources are "
                f"{source_labels(data)}; list the same sources or pretokenize again"
            )

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if epoch != self._order_epoch:
            n = self.meta["num_sequences"]
            index_type = np.uint32 if n <= np.iinfo(np.uint32).max else np.int64
            self._order = np.random.default_rng([self.seed, epoch]).permutation(n).astype(index_type)
            self._order_epoch = epoch
        return self._order

    def _rows(self, start: int, count: int) -> np.ndarray:
        """Dataset rows of global positions ``start .. start+count`` (crossing epochs if needed)."""
        n = self.meta["num_sequences"]
        positions = np.arange(start, start + count)
        epochs = positions // n
        rows = np.empty(count, dtype=np.int64)
        for epoch in np.unique(epochs):
            sel = epochs == epoch
            rows[sel] = self._epoch_order(int(epoch))[positions[sel] % n]
        return rows

    def next_batch(self, batch_size: int) -> dict:
        """``batch_size`` sequences as ``[B, L]`` tensors plus ``doc_ids`` (a list of B lists).

        All ranks call it in lockstep: each call consumes ``batch_size × world_size`` sequences of
        the global order, of which this rank takes slice ``rank``.
        """
        rows = self._rows(self.consumed + self.rank * batch_size, batch_size)
        self.consumed += batch_size * self.world_size
        ids = torch.from_numpy(self.input_ids[rows].astype(np.int64))
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "token_type_ids": torch.zeros_like(ids),
            "doc_ids": [self._docs_of(int(row)) for row in rows],
        }

    def _docs_of(self, row: int) -> list[str]:
        first, last = self.doc_offsets[row], self.doc_offsets[row + 1]
        if first == last:  # no document starts in this sequence
            return []
        raw = self.doc_id_text[self.doc_id_bytes[first] : self.doc_id_bytes[last]].tobytes()
        return raw.decode("utf-8").splitlines()

    def stats(self) -> dict:
        """The corpus counters of the pretokenize pass, this rank's sequences so far, the epoch."""
        n = self.meta["num_sequences"]
        mine = self.consumed // self.world_size
        return {
            "epoch": self.consumed // n,
            **{k: v for k, v in self.meta["counters"].items() if k != "documents_packed"},
            "sequences": mine,
            "tokens": mine * self.meta["max_seq_length"],
        }

    def state_dict(self) -> dict:
        return {
            "kind": STATE_KIND,
            "consumed": self.consumed,
            "num_sequences": self.meta["num_sequences"],
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue after ``state`` (from any rank of a run at any world size)."""
        if state.get("kind") != STATE_KIND:
            raise DataError(
                "the checkpoint's data position is of a streamed corpus, but data.pretokenized_dir is set; "
                "resume with the same data section"
            )
        for key in ("num_sequences", "seed"):
            mine = self.meta["num_sequences"] if key == "num_sequences" else self.seed
            if state[key] != mine:
                raise DataError(
                    f"the checkpoint's data position was saved with {key}={state[key]} "
                    f"but this run has {mine}; "
                    "resume with the same pretokenized corpus and seed"
                )
        self.consumed = int(state["consumed"])
