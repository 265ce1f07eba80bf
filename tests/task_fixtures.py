"""Tiny task teachers (real WordPiece tokenizer, random weights, a task head) and task-run specs."""

from __future__ import annotations

import json
from pathlib import Path

from run_fixtures import save_tiny_bert
from transformers import BertForQuestionAnswering, BertForSequenceClassification

from mlkd_scale.tasks.glue.table import get_task
from mlkd_scale.tasks.squad.names import squad_task_name

REPO = Path(__file__).resolve().parents[1]
GLUE = REPO / "tests" / "assets" / "glue"
SQUAD = REPO / "tests" / "assets" / "squad"
#: Small windows so that the tiny paragraphs are cut into several (query cut, stride exercised).
SQUAD_WINDOWS = {"max_seq_length": 64, "squad": {"doc_stride": 16, "max_query_length": 12}}
#: MNLI labels in the order of the legacy transformers processors: exercises teacher_label_order.
LEGACY_MNLI = ("contradiction", "entailment", "neutral")


def make_task_teacher(directory: Path, task: str, seed: int = 0, legacy_mnli: bool = True) -> Path:
    """A random BertForSequenceClassification for ``task`` with the real tokenizer, saved to ``directory``."""
    spec = get_task(task)
    names = LEGACY_MNLI if spec.name == "MNLI" and legacy_mnli else spec.label_names
    labels = {"num_labels": 1} if spec.is_regression else {
        "num_labels": len(names), "id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}}
    return save_tiny_bert(directory, BertForSequenceClassification, seed, **labels)


def make_qa_teacher(directory: Path, seed: int = 0) -> Path:
    """A random BertForQuestionAnswering (the tiny teachers' sizes) with the real tokenizer."""
    return save_tiny_bert(directory, BertForQuestionAnswering, seed)


def squad_files(version: str) -> dict:
    """task.squad train_file/dev_file: the tiny official-format file of ``version`` for both."""
    path = str(SQUAD / ("tiny-v1.1.json" if squad_task_name(version) == "squad_v1" else "tiny-v2.0.json"))
    return {"train_file": path, "dev_file": path}


def task_spec(tmp: Path, teacher: Path, task: str, path: Path | None = None, **overrides) -> Path:
    """A tiny task-run spec; ``section__key=value`` overrides a key, ``section=value`` a whole section."""
    spec = {
        "run": {"name": "t", "output_dir": str(tmp / "out"), "seed": 1},
        "teacher": {"path": str(teacher), "dtype": "fp32"},
        "student": {"num_layers": 2, "hidden_size": 24, "num_heads": 3, "intermediate_size": 48},
        "task": {"name": task, "data_dir": None if squad_task_name(task) else str(GLUE / get_task(task).name),
                 "max_seq_length": 32,
                 "eval_batch_size": 4, "finetune": {"max_steps": 3, "lr": 1e-3},
                 "stage1": {"max_steps": 3, "lr": 1e-3}, "stage2": {"max_steps": 3, "lr": 1e-3}},
        "train": {"micro_batch_size": 4, "gradient_accumulation_steps": 1, "precision": "fp32", "zero_stage": 2},
        "checkpoint": {"every_n_steps": 2, "keep_last": 1},
        "logging": {"every_n_steps": 1, "progress_bar": False},
    }
    for dotted, value in overrides.items():
        if "__" in dotted:
            section, key = dotted.split("__")
            spec[section][key] = value
        else:
            spec[dotted] = value
    path = path or tmp / "spec.json"
    path.write_text(json.dumps(spec, indent=1))
    return path


def run_task_launcher(script: str, spec: Path, *extra: str, ranks: int = 2, timeout: int = 600):
    """``deepspeed --num_gpus N launchers/<script> --spec SPEC`` on CPU ranks; returns the process."""
    import subprocess
    import sys

    from run_fixtures import _free_port, child_env

    env = child_env()
    deepspeed = Path(sys.executable).parent / "deepspeed"
    cmd = [str(deepspeed), "--num_gpus", str(ranks), "--master_port", str(_free_port()),
           str(REPO / "launchers" / script), "--spec", str(spec), *extra]
    return subprocess.run(cmd, cwd=spec.parent, env=env, capture_output=True, text=True, timeout=timeout, check=False)
