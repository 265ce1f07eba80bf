"""Pretokenized corpora: the same sequences as streaming, a global shuffle, exact resume at any world size."""

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from run_fixtures import child_env, make_corpus, make_spec, make_teacher, run_launcher, sample_ids
from transformers import AutoTokenizer

from mlkd_scale.data.corpus.pretokenized import PretokenizedStream, write_pretokenized
from mlkd_scale.data.corpus.sources import DataError
from mlkd_scale.data.corpus.stream import PackedStream, open_stream
from mlkd_scale.spec import DataSpec

SEQ = 32


@pytest.fixture(scope="module")
def corpus_and_teacher(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pretok")
    return make_corpus(tmp / "corpus.jsonl", docs=300), make_teacher(tmp / "teacher")


@pytest.fixture(scope="module")
def written(corpus_and_teacher, tmp_path_factory):
    corpus, teacher = corpus_and_teacher
    out = tmp_path_factory.mktemp("written") / "pt"
    data = DataSpec(sources=[{"path": str(corpus)}], max_seq_length=SEQ)
    meta = write_pretokenized(data, str(teacher), out, seed=1, workers=0)
    return data.model_copy(update={"pretokenized_dir": str(out)}), meta


def _tokenizer(teacher):
    return AutoTokenizer.from_pretrained(teacher)


def test_rows_are_the_streamed_sequences_in_corpus_order(corpus_and_teacher, written):
    corpus, teacher = corpus_and_teacher
    data, meta = written
    stream = PackedStream(data.model_copy(update={"shuffle_buffer": 0}), _tokenizer(teacher), 0, 1, seed=1)
    pretok = PretokenizedStream(data, _tokenizer(teacher), 0, 1, seed=1)
    n = meta["num_sequences"]
    assert n > 20 and meta["counters"]["documents_packed"] == 300
    for row in range(n):
        sample = stream.next_sample()
        assert pretok.input_ids[row].tolist() == sample["input_ids"].tolist()
        assert pretok._docs_of(row) == sample["doc_ids"]


def test_worker_processes_write_the_same_bytes(corpus_and_teacher, written, tmp_path):
    corpus, teacher = corpus_and_teacher
    data, _ = written
    out = tmp_path / "pt2"
    write_pretokenized(data, str(teacher), out, seed=1, workers=2)
    first = Path(data.pretokenized_dir)
    for name in ("input_ids.bin", "doc_offsets.bin", "doc_ids.txt"):
        assert (out / name).read_bytes() == (first / name).read_bytes(), name


def test_each_epoch_is_a_fresh_permutation_split_across_ranks(corpus_and_teacher, written):
    _, teacher = corpus_and_teacher
    data, meta = written
    n = meta["num_sequences"]
    ranks = [PretokenizedStream(data, _tokenizer(teacher), r, 2, seed=3) for r in (0, 1)]
    per_epoch = n - n % 4  # a call of batch 2 on 2 ranks takes 4 sequences; stay inside epoch 0
    epoch0 = []
    for _ in range(per_epoch // 4):
        for s in ranks:
            epoch0 += s._rows(s.consumed + s.rank * 2, 2).tolist()
            s.next_batch(2)
    assert len(set(epoch0)) == len(epoch0) == per_epoch  # nothing twice within an epoch
    order0 = ranks[0]._epoch_order(0).tolist()
    order1 = ranks[0]._epoch_order(1).tolist()
    assert sorted(order0) == sorted(order1) == list(range(n)) and order0 != order1


def test_resume_at_another_world_size_takes_every_sequence_once(corpus_and_teacher, written):
    _, teacher = corpus_and_teacher
    data, meta = written
    tok = _tokenizer(teacher)
    n = meta["num_sequences"]
    seen = []
    two = [PretokenizedStream(data, tok, r, 2, seed=5) for r in (0, 1)]
    for _ in range(3):
        for s in two:
            seen += s._rows(s.consumed + s.rank * 2, 2).tolist()
            s.next_batch(2)
    state = two[1].state_dict()  # any rank's state: the position is global
    three = [PretokenizedStream(data, tok, r, 3, seed=5) for r in (0, 1, 2)]
    for s in three:
        s.load_state_dict(state)
    while three[0].consumed + 3 * 2 <= n:
        for s in three:
            seen += s._rows(s.consumed + s.rank * 2, 2).tolist()
            s.next_batch(2)
    one = PretokenizedStream(data, tok, 0, 1, seed=5)
    one.load_state_dict(three[2].state_dict())
    seen += one._rows(one.consumed, n - one.consumed).tolist()
    assert Counter(seen) == Counter(range(n))


def test_batches_hold_source_doc_ids_and_full_rows(corpus_and_teacher, written):
    _, teacher = corpus_and_teacher
    data, _ = written
    stream = open_stream(data, _tokenizer(teacher), 0, 1, seed=1)
    assert isinstance(stream, PretokenizedStream)
    batch = stream.next_batch(4)
    assert batch["input_ids"].shape == (4, SEQ) and batch["input_ids"].dtype == torch.long
    assert (batch["input_ids"][:, 0] == 101).all() and (batch["input_ids"][:, -1] == 102).all()
    assert all(doc.startswith("0:") for docs in batch["doc_ids"] for doc in docs)
    assert stream.stats()["sequences"] == 4


def test_mismatches_are_one_clear_error(corpus_and_teacher, written, tmp_path):
    corpus, teacher = corpus_and_teacher
    data, _ = written
    tok = _tokenizer(teacher)
    with pytest.raises(DataError, match="max_seq_length"):
        PretokenizedStream(data.model_copy(update={"max_seq_length": 64}), tok, 0, 1, 1)
    other = DataSpec.model_validate({**data.model_dump(), "sources": [{"path": str(corpus), "weight": 2.0}]})
    with pytest.raises(DataError, match="sources"):
        PretokenizedStream(other, tok, 0, 1, 1)
    with pytest.raises(DataError, match="mlkd-scale pretokenize"):
        PretokenizedStream(data.model_copy(update={"pretokenized_dir": str(tmp_path)}), tok, 0, 1, 1)
    with pytest.raises(DataError, match="already holds"):
        write_pretokenized(data, str(teacher), data.pretokenized_dir, seed=1, workers=0)
    stream = PretokenizedStream(data, tok, 0, 1, 1)
    with pytest.raises(DataError, match="seed"):
        stream.load_state_dict({**stream.state_dict(), "seed": 2})
    with pytest.raises(DataError, match="streamed corpus"):
        stream.load_state_dict({"version": 1, "datasets": {}})


@pytest.mark.launcher
def test_cli_then_two_ranks_then_one_rank_without_loss_or_repeat(corpus_and_teacher, tmp_path):
    """pretokenize through the CLI; 2 ranks (ZeRO-0) stop at step 4; 1 rank with twice the
    accumulation (same global batch) finishes: every document of the rows the run took, once."""
    corpus, teacher = corpus_and_teacher
    spec = make_spec(tmp_path, teacher, corpus, train__max_steps=6, train__zero_stage=0)
    raw = json.loads(spec.read_text())
    raw["data"]["pretokenized_dir"] = str(tmp_path / "pt")
    spec.write_text(json.dumps(raw))
    cli = Path(sys.executable).parent / "mlkd-scale"
    made = subprocess.run([str(cli), "pretokenize", str(spec), "--workers", "1"], env=child_env(),
                          capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr
    assert "sequences of 32 tokens" in made.stdout

    first = run_launcher(spec, "--stop_after_steps", "4")
    assert first.returncode == 0, first.stderr[-3000:]
    raw["train"]["gradient_accumulation_steps"] = 4
    spec.write_text(json.dumps(raw))
    second = run_launcher(spec, ranks=1)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout
    # The run took global positions 0..95 of epoch 0's order (6 steps x 16 sequences): exactly the
    # documents starting in those rows, each once, across the restart at another world size.
    data = DataSpec.model_validate(raw["data"])
    reference = PretokenizedStream(data, _tokenizer(teacher), 0, 1, seed=raw["run"]["seed"])
    rows = reference._rows(0, 6 * 16)
    assert len(rows) < reference.meta["num_sequences"]
    expected = [doc for row in rows for doc in reference._docs_of(int(row))]
    assert Counter(sample_ids(tmp_path / "out")) == Counter(expected)
    assert len(expected) == len(set(expected))
