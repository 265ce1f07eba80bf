"""SQuAD v1.1 / v2.0 in teacher fine-tuning and task distillation: spec, task data, span KD, scoring, runs.

The runs use the tiny official-format files of ``tests/assets/squad`` (train and dev alike), tiny
random models and small windows (64 tokens, stride 16), so every paragraph is cut into several
windows. In-process runs are world size 1; the 2-rank path runs through the real ``deepspeed``
launcher (``@pytest.mark.launcher``).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from run_fixtures import make_teacher
from task_fixtures import SQUAD, SQUAD_WINDOWS, make_qa_teacher, run_task_launcher, squad_files, task_spec
from transformers import (
    AutoModelForQuestionAnswering,
    AutoTokenizer,
    BertConfig,
    BertForQuestionAnswering,
    BertModel,
)

from mlkd_scale.engine.task.context import evaluate_model_dir
from mlkd_scale.engine.task.distill import run_task_kd
from mlkd_scale.engine.task.finetune import run_finetune
from mlkd_scale.engine.trackers import read_scalars
from mlkd_scale.losses import DistillationObjective
from mlkd_scale.models import Features
from mlkd_scale.spec import LossesSpec, RunSpec, SpecError, load_spec
from mlkd_scale.tasks.registry import open_task
from mlkd_scale.tasks.squad.names import squad_task_name
from mlkd_scale.tasks.squad.pipeline import prepare_train_features, read_squad
from mlkd_scale.tasks.squad.task import limit_questions

V2_KEYS = {"exact", "f1", "total", "HasAns_exact", "HasAns_f1", "HasAns_total", "NoAns_exact", "NoAns_f1",
           "NoAns_total", "best_exact", "best_exact_thresh", "best_f1", "best_f1_thresh"}


def squad_spec(tmp: Path, teacher: Path, version: str, path: Path | None = None, **overrides) -> Path:
    """A tiny SQuAD task spec (files given as task.squad train_file/dev_file unless overridden)."""
    squad = {**SQUAD_WINDOWS["squad"], **squad_files(version), **overrides.pop("squad", {})}
    return task_spec(tmp, teacher, version, path=path, task__max_seq_length=SQUAD_WINDOWS["max_seq_length"],
                     task__squad=squad, **overrides)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return AutoTokenizer.from_pretrained(make_qa_teacher(tmp_path_factory.mktemp("tok")))


# ------------------------------------------------------------------------------------------ spec


@pytest.mark.parametrize(("spelling", "name"), [
    ("squad", "squad_v1"), ("SQuAD", "squad_v1"), ("squad_v1", "squad_v1"), ("SQuAD 1.1", "squad_v1"),
    ("squad-v1.1", "squad_v1"), ("squad2", "squad_v2"), ("SQuAD_v2.0", "squad_v2"), ("squad v2", "squad_v2"),
])
def test_any_spelling_of_a_squad_version(tmp_path: Path, spelling: str, name: str) -> None:
    assert squad_task_name(spelling) == name
    path = task_spec(tmp_path, make_qa_teacher(tmp_path / "t"), spelling)
    raw = json.loads(path.read_text())
    del raw["task"]["max_seq_length"]
    path.write_text(json.dumps(raw))
    # the tiny teacher has 64 positions, too few for the default windows: validation says so ...
    with pytest.raises(SpecError, match=r"^task\.max_seq_length: 384 tokens per sequence, but teacher\.path"):
        load_spec(path)
    spec = RunSpec.model_validate(raw)  # ... and the section itself is valid
    assert spec.task.name == name and spec.task.is_squad
    # the documented defaults: run_qa.py's windows and post-processing, F1 selection
    assert spec.task.max_seq_length == 384
    assert spec.task.squad.model_dump() == {
        "train_file": None, "dev_file": None, "doc_stride": 128, "max_query_length": 64, "n_best": 20,
        "max_answer_length": 30, "null_score_threshold": 0.0, "selection_metric": "f1"}


def test_glue_specs_are_unchanged(tmp_path: Path) -> None:
    spec = load_spec(task_spec(tmp_path, make_qa_teacher(tmp_path / "t"), "sst2"))
    assert spec.task.name == "SST-2" and spec.task.squad is None and spec.task.max_seq_length == 32
    assert squad_task_name("SST-2") is None and squad_task_name("squad3") is None


@pytest.mark.parametrize(("overrides", "message"), [
    ({"task__name": "squad3"}, "task.name: unknown GLUE task 'squad3'; expected one of: CoLA, "),
    ({"task__name": "SST-2"}, "task.squad: only SQuAD tasks take it (SST-2 is GLUE); remove it"),
    ({"task__augmented_dir": "/tmp"}, "task.augmented_dir: not available for SQuAD"),
    ({"squad": {"doc_stride": 48}}, ("task.squad.doc_stride: 48 must be below max_seq_length - "
                                     "squad.max_query_length - 4 = 48 (the context tokens of a window)")),
    ({"losses": {"weights": {"sc": 1.0}}}, "losses.weights: sc (sample-contrastive) needs class labels"),
    ({"squad": {"train_file": "/nowhere/train.json"}}, "task.squad.train_file: file /nowhere/train.json does not"),
    ({"task__data_dir": "/nowhere"}, ("task.data_dir: directory /nowhere does not exist; give the folder of the "
                                      "official SQuAD JSON files")),
])
def test_bad_squad_specs_are_one_clear_error(tmp_path: Path, overrides: dict, message: str) -> None:
    with pytest.raises(SpecError) as info:
        load_spec(squad_spec(tmp_path, make_qa_teacher(tmp_path / "t"), "squad_v2", **overrides))
    problems = info.value.problems
    assert len(problems) == 1 and problems[0].startswith(message), problems


# ------------------------------------------------------------------------------------ task data


def test_windows_masks_and_question_cut(tmp_path: Path, tokenizer) -> None:
    spec = load_spec(squad_spec(tmp_path, make_qa_teacher(tmp_path / "t"), "squad_v2",
                                squad={"max_query_length": 5})).task
    data = open_task(spec).load_data(tokenizer, with_augmented=False)
    examples = read_squad(SQUAD / "tiny-v2.0.json")
    assert data.task.name == "squad_v2" and data.task.main_metric == "f1" and data.stage1_train is data.train
    train, dev = data.train, data.dev["validation"]
    assert len(train) == len(dev) > len(examples)  # several windows per paragraph, same windows in both
    assert torch.equal(train.tensors["input_ids"], dev.tensors["input_ids"])
    # questions are cut to max_query_length tokens: [CLS] + 5 question tokens + [SEP] open every window
    sep = tokenizer.sep_token_id
    assert all(int((row == sep).nonzero()[0]) == 6 for row in train.tensors["input_ids"])
    assert all(len(tokenizer(e.question, add_special_tokens=False)["input_ids"]) <= 5
               for e in limit_questions(examples, tokenizer, 5))
    # span_mask: [CLS] and exactly the context tokens (token type 1 minus the closing [SEP])
    mask, types, ids = train.tensors["span_mask"], train.tensors["token_type_ids"], train.tensors["input_ids"]
    assert mask[:, 0].all()
    assert torch.equal(mask[:, 1:], ((types == 1) & (ids != sep))[:, 1:])
    # every labelled position is a valid one; unanswerable questions point at [CLS]
    rows = torch.arange(len(train))
    assert mask[rows, train.tensors["start_positions"]].all() and mask[rows, train.tensors["end_positions"]].all()
    impossible = {e.id for e in examples if e.is_impossible}
    for i, qid in enumerate(train.example_ids):
        if qid in impossible:
            assert int(train.tensors["start_positions"][i]) == int(train.tensors["end_positions"][i]) == 0


def test_data_dir_layout_and_the_hub_read_the_same(tmp_path: Path, tokenizer, monkeypatch) -> None:
    import datasets
    from datasets import Dataset

    folder = tmp_path / "squad"
    folder.mkdir()
    for name in ("train-v1.1.json", "dev-v1.1.json"):
        shutil.copy(SQUAD / "tiny-v1.1.json", folder / name)
    teacher = make_qa_teacher(tmp_path / "t")
    no_files = {"train_file": None, "dev_file": None}
    from_files = open_task(load_spec(squad_spec(tmp_path, teacher, "squad")).task).load_data(tokenizer, with_augmented=False)
    from_dir = open_task(
        load_spec(squad_spec(tmp_path, teacher, "squad", task__data_dir=str(folder), squad=no_files)).task).load_data(tokenizer, with_augmented=False)
    assert torch.equal(from_dir.train.tensors["input_ids"], from_files.train.tensors["input_ids"])

    examples = read_squad(SQUAD / "tiny-v1.1.json")
    rows = [{"id": e.id, "title": e.title, "context": e.context, "question": e.question,
             "answers": {"text": [a.text for a in e.answers], "answer_start": [a.start for a in e.answers]}}
            for e in examples]
    calls = []

    def fake_load_dataset(name, split=None, **kwargs):
        calls.append((name, split))
        return Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    hub_spec = load_spec(squad_spec(tmp_path, teacher, "squad", squad=no_files))
    from_hub = open_task(hub_spec.task).load_data(tokenizer, with_augmented=False)
    assert calls == [("rajpurkar/squad", "train"), ("rajpurkar/squad", "validation")]
    assert torch.equal(from_hub.train.tensors["start_positions"], from_files.train.tensors["start_positions"])

    (folder / "dev-v1.1.json").unlink()
    with pytest.raises(ValueError, match=r"task.data_dir: .* has no dev-v1.1.json; put the official file there"):
        open_task(load_spec(squad_spec(tmp_path, teacher, "squad", task__data_dir=str(folder),
                                                  squad=no_files)).task).load_data(tokenizer, with_augmented=False)
    v2_as_v1 = squad_spec(tmp_path, teacher, "squad", squad=squad_files("squad_v2"))
    with pytest.raises(ValueError, match="has no answer, which SQuAD v1.1 does not allow; .* set task.name to squad_v2"):
        open_task(load_spec(v2_as_v1).task).load_data(tokenizer, with_augmented=False)


@pytest.mark.parametrize("version", ["squad_v1", "squad_v2"])
def test_oracle_logits_score_100(tmp_path: Path, tokenizer, version: str) -> None:
    """Logits that point at the gold labels of every window score 100 after post-processing."""
    spec = load_spec(squad_spec(tmp_path, make_qa_teacher(tmp_path / "t"), version)).task
    data = open_task(spec).load_data(tokenizer, with_augmented=False)
    labels = prepare_train_features(
        limit_questions(read_squad(squad_files(version)["dev_file"]), tokenizer, spec.squad.max_query_length),
        tokenizer, spec.max_seq_length, spec.squad.doc_stride)
    logits = torch.zeros(len(data.train), 2, spec.max_seq_length)
    rows = torch.arange(len(data.train))
    logits[rows, 0, labels["start_positions"]] = 10.0
    logits[rows, 1, labels["end_positions"]] = 10.0
    scores = data.dev["validation"].score(logits)
    assert scores["exact"] == scores["f1"] == 100.0
    if version == "squad_v2":
        assert set(scores) == V2_KEYS and scores["HasAns_f1"] == scores["NoAns_f1"] == scores["best_f1"] == 100.0
    # all logits equal: no window prefers a span, v1 answers something, v2 abstains at threshold 0
    flat = data.dev["validation"].score(torch.zeros_like(logits))
    assert flat["f1"] < 100.0


# ------------------------------------------------------------------------------------ span KD


def _objective(**losses) -> DistillationObjective:
    config = BertConfig(hidden_size=24, num_hidden_layers=2, num_attention_heads=3, intermediate_size=48)
    return DistillationObjective(LossesSpec(**losses), config, config, stage=2, qa=True)


def test_span_kd_is_the_masked_kl_of_start_and_end() -> None:
    torch.manual_seed(0)
    objective = _objective(kd_temperature=2.0)
    assert set(objective.weights) == {"ss", "kd"}  # sc is off for QA
    batch, length = 3, 10
    mask = torch.zeros(batch, length, dtype=torch.bool)
    mask[:, 0] = True
    mask[0, 4:9], mask[1, 3:6], mask[2, 2:10] = True, True, True
    t = Features(cls=torch.randn(batch, 24), logits=torch.randn(batch, 2, length) * 3)
    s = Features(cls=torch.randn(batch, 24), logits=torch.randn(batch, 2, length, requires_grad=True))
    _, terms = objective(t, s, torch.ones(batch, length), None, mask)

    tau, expected = 2.0, []
    for b in range(batch):
        for x in range(2):
            p = F.softmax(t.logits[b, x, mask[b]] / tau, -1)
            q = F.log_softmax(s.logits[b, x, mask[b]].detach() / tau, -1)
            expected.append((p * (p.log() - q)).sum())
    scale = tau**2 if objective.spec.kd_scale_by_t2 else 1.0
    assert float(terms["kd"]) == pytest.approx(float(torch.stack(expected).mean()) * scale, rel=1e-5)

    # logits outside the mask (padding, question) change nothing, and get no gradient
    noisy = t.logits.masked_fill(~mask.unsqueeze(1), 1e3)
    total, again = objective(Features(cls=t.cls, logits=noisy), s, torch.ones(batch, length), None, mask)
    assert float(again["kd"]) == pytest.approx(float(terms["kd"]), rel=1e-6)
    total.backward()
    assert not s.logits.grad.masked_select(~mask.unsqueeze(1).expand_as(s.logits)).any()
    assert math.isfinite(float(total.detach()))


def test_sample_contrastive_for_qa_is_an_error() -> None:
    with pytest.raises(ValueError, match="sc .sample-contrastive. needs class labels, which question answering has not"):
        _objective(weights={"sc": 0.5})
    assert "sc" not in _objective(weights={"sc": 0.0}).weights


# ----------------------------------------------------------------------------------- end to end


def _check_export(out_dir: Path, spec_path: Path, stage: str) -> dict:
    """The export loads as a QA model and scores on dev what eval_results.json recorded."""
    report = json.loads((out_dir / "eval_results.json").read_text())
    assert report["stage"] == stage and report["main_metric"] == "f1"
    model = AutoModelForQuestionAnswering.from_pretrained(out_dir)
    assert isinstance(model, BertForQuestionAnswering)
    reloaded = evaluate_model_dir(out_dir, load_spec(spec_path).task)
    assert reloaded["validation"] == pytest.approx(report["dev"]["validation"], abs=1e-6)
    return report


@pytest.mark.parametrize("version", ["squad_v1", "squad_v2"])
def test_finetune_then_distil_end_to_end(tmp_path: Path, world, capsys, tokenizer, version: str) -> None:
    encoder = make_teacher(tmp_path / "encoder")  # a bare pre-trained encoder: the QA head is fresh
    ft_spec = squad_spec(tmp_path, encoder, version, path=tmp_path / "ft.json", task__eval_every_n_steps=2,
                         run={"name": "ft", "output_dir": str(tmp_path / "ft"), "seed": 1},
                         task__finetune={"max_steps": 4, "lr": 1e-3})
    result = run_finetune(load_spec(ft_spec), dist=world)
    stdout = capsys.readouterr().out
    assert result["finished"] and "teacher exported to" in stdout
    teacher = tmp_path / "ft" / "teacher"
    report = _check_export(teacher, ft_spec, "finetune")
    ft_scalars = read_scalars(tmp_path / "ft" / "tensorboard")
    assert [s for s, _ in ft_scalars["finetune/loss/start_ce"]] == [1, 2, 3, 4]
    assert [s for s, _ in ft_scalars["eval/f1"]] == [2, 4]

    budget = {"max_steps": 2, "lr": 1e-3}
    student = {"num_layers": 2, "hidden_size": 24, "num_heads": 3, "intermediate_size": 48}
    if version == "squad_v1":  # from a general-distillation student (a bare encoder): the QA head is fresh
        general = tmp_path / "general_student"
        BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=24, num_hidden_layers=2, num_attention_heads=3,
                             intermediate_size=48, max_position_embeddings=64)).save_pretrained(general)
        student = {"init": "path", "path": str(general)}
    kd_spec = squad_spec(tmp_path, teacher, version, path=tmp_path / "kd.json", task__eval_every_n_steps=1,
                         task__stage1=budget, task__stage2=budget, student=student)
    result = run_task_kd(load_spec(kd_spec), dist=world)
    stdout = capsys.readouterr().out
    assert result["finished"] and "run finished at step 4" in stdout
    questions = 9 if version == "squad_v1" else 7
    assert f"task {version}: train {questions} questions in " in stdout
    out = tmp_path / "out"
    student_report = _check_export(out / "student", kd_spec, "stage2")
    # the teacher's dev scores in the run are the fine-tuning run's, and the keys are the official ones
    assert student_report["teacher_dev"]["validation"] == pytest.approx(report["dev"]["validation"], abs=1e-6)
    keys = V2_KEYS if version == "squad_v2" else {"exact", "f1", "total"}
    assert set(student_report["dev"]["validation"]) == keys
    student = AutoModelForQuestionAnswering.from_pretrained(out / "student")
    assert student.config.num_hidden_layers == 2 and student.config.hidden_size == 24

    # the pinned best is the stage's highest dev F1 over its evaluations
    stage2 = json.loads((out / "stage2" / "result.json").read_text())
    scalars = read_scalars(out / "tensorboard")
    f1s = dict(scalars["eval/f1"])
    assert sorted(f1s) == [1, 2, 3, 4]
    assert stage2["best"]["value"] == pytest.approx(max(f1s[3], f1s[4]), rel=1e-6) and student_report["step"] == stage2["best"]["step"]
    assert {"stage1/loss/emb", "stage1/loss/mha", "stage1/loss/ffn", "stage2/loss/ss", "stage2/loss/kd"} <= set(scalars)
    assert "stage2/loss/sc" not in scalars
    if version == "squad_v2":
        assert {"eval/HasAns_f1", "eval/NoAns_f1", "eval/best_f1"} <= set(scalars)


@pytest.mark.launcher
def test_two_ranks_squad_v2_distil_export_reload(tmp_path: Path) -> None:
    teacher = make_qa_teacher(tmp_path / "teacher")
    budget = {"max_steps": 2, "lr": 1e-3}
    spec = squad_spec(tmp_path, teacher, "squad_v2", task__stage1=budget, task__stage2=budget,
                      task__eval_every_n_steps=1, task__eval_batch_size=3)
    proc = run_task_launcher("task_kd.py", spec)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "stage1 finished at step 2" in proc.stdout and "run finished at step 4" in proc.stdout
    out = tmp_path / "out"
    report = _check_export(out / "student", spec, "stage2")  # 2-rank gathered dev scores == 1-process reload
    assert set(report["dev"]["validation"]) == V2_KEYS
    teacher_dev = evaluate_model_dir(teacher, load_spec(spec).task)
    assert report["teacher_dev"]["validation"] == pytest.approx(teacher_dev["validation"], abs=1e-6)
    assert [s for s, _ in read_scalars(out / "tensorboard")["eval/f1"]] == [1, 2, 3, 4]
