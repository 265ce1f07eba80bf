"""The GPU check's steps, each time-boxed, each recorded; every figure into one summary JSON.

``scripts/gpu_check.sh`` calls this (read its header first). It uses the standard library only, so
it runs before the carried wheels are installed; the steps are child processes:

1. ``install``     the wheels into a fresh ``--target`` folder (``pip install --no-index --no-deps``)
   (``cpu_ops``     the dry run only: DeepSpeed's CPU all-reduce op, compiled once, uncapped in effect)
2. ``env``         import every carried package from there; versions, the device, nvidia-smi
3. ``tests``       ``pytest tests/test_cuda.py`` (bf16 teacher, selective attention, engine steps)
4. ``general_kd``  the real teacher (all-MiniLM-L6-v2, bf16) distilled through the launcher
                   (``deepspeed --num_gpus 1 launchers/general_kd.py``) on a local corpus, bf16
5. ``kd_figures``  that run's losses and tokens/s (TensorBoard) and its student's agreement
6. ``throughput``  ``benchmarks/throughput.py``: tokens/s, memory, MFU against a measured bf16 matmul
7. ``peers``       ``benchmarks/peers.py``: ours vs TextBrewer vs a plain loop vs the bare step

A failed or timed-out step is recorded and the next one runs. ``--budget-s`` caps the whole run:
each step gets at most what is left. ``OUT/gpu_check_summary.json`` is rewritten after every step,
so whatever finished is there even if the command is killed; every step's output is appended to
``OUT/gpu_check.log``. ``--mode cpu`` is the dry run: the same steps at tiny sizes on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: Import name of each carried distribution whose import is checked in the ``env`` step.
CARRIED_MODULES = ("deepspeed", "datasets", "pydantic", "pydantic_core", "fire", "hjson", "dill",
                   "multiprocess", "termcolor", "annotated_types", "typing_inspection", "textbrewer")
#: Dense bf16 peak of one GPU from its data sheet, for MFU beside the measured matmul's.
NOMINAL_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0}


@dataclass
class Step:
    """One child process: its command, its time cap, the JSON it leaves (read into the summary)."""

    name: str
    argv: list[str]
    timeout_s: float
    result_json: Path | None = None
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Outcome:
    name: str
    status: str  # ok | failed | timeout | skipped
    seconds: float = 0.0
    timeout_s: float = 0.0
    returncode: int | None = None
    tail: str = ""


def run_step(step: Step, log: Path, remaining_s: float, env: dict[str, str]) -> Outcome:
    """Run ``step`` with its output appended to ``log``, killed (its whole process group) after
    ``min(step.timeout_s, remaining_s)`` seconds. Never raises for the child's failures."""
    limit = min(step.timeout_s, remaining_s)
    if limit < 1:
        return Outcome(step.name, "skipped", timeout_s=limit, tail="no time left in the budget")
    with log.open("a") as out:
        out.write(f"\n===== {step.name}: {' '.join(step.argv)}\n")
        out.flush()
        start = time.monotonic()
        try:
            proc = subprocess.Popen(step.argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                                    env={**env, **step.env}, start_new_session=True)
        except OSError as error:
            return Outcome(step.name, "failed", timeout_s=limit, tail=f"could not start: {error}")
        try:
            code = proc.wait(timeout=limit)
            status = "ok" if code == 0 else "failed"
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            code, status = None, "timeout"
        seconds = time.monotonic() - start
        out.write(f"===== {step.name}: {status} after {seconds:.1f} s\n")
    tail = "" if status == "ok" else "\n".join(log.read_text(errors="replace").splitlines()[-25:])
    return Outcome(step.name, status, round(seconds, 2), round(limit, 1), code, tail)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the step's process group (a launcher and its ranks), SIGKILL what is left after 10 s."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def read_figures(step: Step) -> dict | None:
    """The figures a step left: its JSON file, or a test report's counts for a JUnit XML file."""
    path = step.result_json
    if path is None or not path.exists():
        return None
    if path.suffix == ".xml":
        return junit_counts(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        return {"unreadable": f"{path}: {error}"}


def junit_counts(path: Path) -> dict:
    """Passed/failed/skipped counts and each test's outcome and seconds from pytest's JUnit XML."""
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            if case.find(tag) is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
        cases.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "seconds": float(case.get("time", 0))})
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "error", "skipped")}
    return {**counts, "cases": cases}


def headline(figures: dict) -> dict:
    """The numbers to read first, picked out of every step's figures (absent where a step failed)."""
    out: dict = {}
    tests = figures.get("tests") or {}
    if tests:
        out["tests"] = {k: tests[k] for k in ("passed", "failed", "error", "skipped")}
    tp = figures.get("throughput") or {}
    if tp.get("ranks"):
        rank = tp["ranks"][0]
        peak = tp["config"].get("peak_tflops")
        measured = rank.get("measured_peak_tflops")
        out["throughput"] = {
            "tokens_per_s": tp["tokens_per_s"], "step_s": rank["step_s"], "peak_mem_gib": rank["peak_mem_gib"],
            "model_tflops": tp["model_tflops"], "matmul_tflops": measured,
            "mfu_vs_matmul": tp["model_tflops"] / measured if measured else None,
            "nominal_peak_tflops": peak, "mfu_vs_nominal": tp["model_tflops"] / peak if peak else None,
        }
    peers = figures.get("peers") or {}
    if peers.get("candidates"):
        keys = ("step_s", "tokens_per_s", "vs_bare", "ours_tinybert_speedup", "cpu_s", "gpu_peak_gib")
        out["peers"] = {name: {k: c.get(k) for k in keys} for name, c in peers["candidates"].items()}
    kd = figures.get("kd_figures") or {}
    if kd:
        out["general_kd"] = {k: kd.get(k) for k in ("steps", "first_loss", "last_loss", "tokens_per_s_median",
                                                     "agreement_trained", "agreement_margin")}
    return out


def write_summary(path: Path, meta: dict, outcomes: list[Outcome], figures: dict) -> dict:
    """Write (atomically) and return the summary: run facts, every step's outcome, all figures."""
    summary = {**meta, "elapsed_s": round(time.monotonic() - meta["_t0"], 1),
               "steps": [asdict(o) for o in outcomes], "headline": headline(figures), "figures": figures}
    summary.pop("_t0")
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    tmp.replace(path)
    return summary


def run_all(steps: list[Step], out_dir: Path, budget_s: float, env: dict[str, str], meta: dict) -> dict:
    """Every step in order within ``budget_s``; the summary after each. Returns the last summary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    log, summary_path = out_dir / "gpu_check.log", out_dir / "gpu_check_summary.json"
    log.write_text("")
    meta = {**meta, "budget_s": budget_s, "_t0": time.monotonic()}
    outcomes: list[Outcome] = []
    figures: dict = {}
    summary = write_summary(summary_path, {**meta}, outcomes, figures)
    for step in steps:
        remaining = budget_s - (time.monotonic() - meta["_t0"])
        outcome = run_step(step, log, remaining, env)
        outcomes.append(outcome)
        figures[step.name] = read_figures(step)
        print(f"[gpu_check] {step.name:<11} {outcome.status:<8} {outcome.seconds:7.1f} s "
              f"(cap {outcome.timeout_s:.0f} s)", flush=True)
        if outcome.status != "ok" and outcome.tail:
            print("    " + outcome.tail.replace("\n", "\n    ")[-1500:], flush=True)
        summary = write_summary(summary_path, {**meta}, outcomes, figures)
    return summary


# ---- the steps -----------------------------------------------------------------------------------

#: Sizes per mode: the GPU run's real ones, and the CPU dry run's tiny ones (the same code paths).
SIZES = {
    "gpu": {"budget_s": 470, "kd_steps": 200, "kd_batch": 64, "kd_seq": 128, "agreement_limit": 400,
            "tp": ["--batch", "64", "--steps", "20", "--warmup", "5"],
            "peers": ["--batch", "64", "--rounds", "10", "--warmup", "1"],
            "caps": {"install": 60, "env": 45, "tests": 120, "corpus": 30, "general_kd": 150, "kd_figures": 60,
                     "throughput": 90, "peers": 120}},
    "cpu": {"budget_s": 3600, "kd_steps": 6, "kd_batch": 4, "kd_seq": 64, "agreement_limit": 60,
            "tp": ["--shapes", "tiny", "--seq", "32", "--batch", "4", "--steps", "3", "--warmup", "1", "--threads", "1"],
            "peers": ["--shapes", "tiny", "--seq", "32", "--batch", "4", "--rounds", "2", "--warmup", "1", "--threads", "1"],
            "caps": {"install": 120, "cpu_ops": 900, "env": 120, "tests": 400, "corpus": 60, "general_kd": 400,
                     "kd_figures": 240, "throughput": 400, "peers": 400}},
}


def gpu_name() -> str:
    """The first GPU's name from nvidia-smi ('' when there is none)."""
    if not shutil.which("nvidia-smi"):
        return ""
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                         text=True, check=False)
    return smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else ""


def free_port() -> int:
    """A local TCP port free now (the launcher's default 29500 may be another run's on a shared machine)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kd_argv(args: argparse.Namespace, size: dict) -> list[str]:
    """The quick-start spec through the launcher on one device, in bf16, with the real teacher."""
    source = json.dumps([{"path": str(args.work / "corpus" / "train.jsonl"), "text_field": "text"}])
    overrides = {
        "run.output_dir": str(args.work / "kd"), "teacher.path": str(args.teacher), "teacher.dtype": "bf16",
        "train.precision": "bf16", "train.max_steps": size["kd_steps"], "train.micro_batch_size": size["kd_batch"],
        "data.max_seq_length": size["kd_seq"], "data.sources": source, "checkpoint.every_n_steps": 100000,
        "logging.every_n_steps": max(1, size["kd_steps"] // 10), "logging.progress_bar": False,
    }
    sets = [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]
    return [str(args.target / "bin" / "deepspeed"), "--num_gpus", "1", "--master_port", str(free_port()),
            "launchers/general_kd.py",
            "--spec", "examples/quickstart.json", *sets]


def build_steps(args: argparse.Namespace) -> list[Step]:
    """The steps of ``args.mode`` ('gpu' or 'cpu'), with their caps and result files."""
    size, py, work = SIZES[args.mode], args.python, args.work
    caps = size["caps"]
    figures = str(REPO / "scripts" / "gpu_check_figures.py")
    wheels = sorted(str(p) for p in args.wheels.glob("*.whl"))
    name = gpu_name()
    peak = next((v for k, v in NOMINAL_BF16_TFLOPS.items() if k in name), None)
    bf16 = ["--teacher-dtype", "bf16", "--student-precision", "bf16"]
    return [
        Step("install", [py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                         "--no-cache-dir", "--upgrade", "--target", str(args.target), *wheels], caps["install"]),
        *([Step("cpu_ops", [py, "-c", "from deepspeed.comm.torch import build_shm_op; build_shm_op()"],
                caps["cpu_ops"])] if args.mode == "cpu" else []),
        Step("env", [py, figures, "env", "--target", str(args.target), "--json", str(work / "env.json")],
             caps["env"], work / "env.json"),
        Step("tests", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py",
                       f"--junitxml={work / 'tests.xml'}"], caps["tests"], work / "tests.xml"),
        Step("corpus", [py, "-m", "mlkd_scale.data.corpus.local_corpus", str(work / "corpus")], caps["corpus"]),
        Step("general_kd", kd_argv(args, size), caps["general_kd"]),
        Step("kd_figures", [py, figures, "kd", "--run-dir", str(work / "kd"), "--teacher", str(args.teacher),
                            "--heldout", str(work / "corpus" / "heldout.jsonl"),
                            "--limit", str(size["agreement_limit"]), "--json", str(work / "kd_figures.json")],
             caps["kd_figures"], work / "kd_figures.json"),
        Step("throughput", [py, "benchmarks/throughput.py", *size["tp"], *bf16, "--json", str(work / "throughput.json"),
                            *(["--peak-tflops", str(peak)] if peak else [])], caps["throughput"],
             work / "throughput.json"),
        Step("peers", [py, "benchmarks/peers.py", *size["peers"], *bf16, "--json", str(work / "peers.json")],
             caps["peers"], work / "peers.json"),
    ]


def step_env(args: argparse.Namespace) -> dict[str, str]:
    """The steps' environment: the wheels' folder and this checkout first on the path; on the CPU,
    DeepSpeed's CPU accelerator and one thread, and test_cuda.py's checks on the CPU."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(args.target), str(REPO)]), PYTHONUNBUFFERED="1",
               PATH=os.pathsep.join([str(args.target / "bin"), os.environ.get("PATH", "")]))
    if args.mode == "cpu":
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", MLKD_CUDA_TESTS_ON_CPU="1")
    return env


def main(argv: list[str] | None = None) -> int:
    """Run every step; print the headline figures; exit 1 when any step did not end ok."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=list(SIZES), default="gpu", help="gpu, or cpu for the dry run")
    parser.add_argument("--python", default=sys.executable, help="the interpreter of every step")
    parser.add_argument("--wheels", type=Path, default=REPO / ".whl", help="the folder scripts/gpu_wheels.py built")
    parser.add_argument("--teacher", type=Path, default=None, help="default WHEELS/teacher_bf16")
    parser.add_argument("--target", type=Path, default=Path("/tmp/site"), help="where the wheels are installed")
    parser.add_argument("--work", type=Path, default=Path("/tmp/gpu_check_work"), help="runs, corpora, raw JSON")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or REPO / "gpu_check_out"))
    parser.add_argument("--budget-s", type=float, default=None, help="the whole run's cap (default per mode)")
    parser.add_argument("--only", default=None, help="comma-separated steps to run (e.g. install,env,peers)")
    args = parser.parse_args(argv)
    args.teacher = args.teacher or args.wheels / "teacher_bf16"
    budget = args.budget_s or SIZES[args.mode]["budget_s"]
    meta = {"mode": args.mode, "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "host": os.uname().nodename, "gpu": gpu_name(), "python": sys.version.split()[0],
            "commit": _commit(), "wheels": str(args.wheels), "teacher": str(args.teacher)}
    steps = build_steps(args)
    if args.only:
        wanted = args.only.split(",")
        unknown = sorted(set(wanted) - {step.name for step in steps})
        if unknown:
            parser.error(f"--only: no step {unknown}; the steps are {', '.join(s.name for s in steps)}")
        steps = [step for step in steps if step.name in wanted]
    # A fresh start, except what a partial rerun (--only) keeps: earlier steps' runs, installed wheels.
    if not args.only:
        shutil.rmtree(args.work, ignore_errors=True)
    names = {step.name for step in steps}
    if "install" in names:
        shutil.rmtree(args.target, ignore_errors=True)
    if "general_kd" in names:  # else the launcher would resume the finished run of an earlier call
        shutil.rmtree(args.work / "kd", ignore_errors=True)
    args.work.mkdir(parents=True, exist_ok=True)
    summary = run_all(steps, args.out, budget, step_env(args), meta)
    print(json.dumps(summary["headline"], indent=1, default=str))
    print(f"[gpu_check] {args.out / 'gpu_check_summary.json'} ({summary['elapsed_s']} s in all)")
    return 0 if all(s["status"] == "ok" for s in summary["steps"]) else 1


def _commit() -> str:
    proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False)
    return proc.stdout.strip() if proc.returncode == 0 else "unknown (no .git here)"


if __name__ == "__main__":
    sys.exit(main())
