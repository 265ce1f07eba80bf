#!/usr/bin/env bash
# The one prepared GPU check (issue 16). On a fresh single-GPU machine that has torch and
# transformers but none of this project's other dependencies, and no package registry:
#
#     bash scripts/gpu_check.sh               # needs .whl/ (built here by scripts/gpu_wheels.py, carried)
#
# installs the carried wheels into /tmp/site, then runs, each step time-boxed and recorded, within
# 470 s: the CUDA tests, a bf16 general-distillation run of the real teacher through the launcher
# on 1 GPU, benchmarks/throughput.py and benchmarks/peers.py at batch 64. Every figure goes into
# $OUT/gpu_check_summary.json (OUT defaults to ./gpu_check_out), every step's output into
# $OUT/gpu_check.log. Exit status 0 only when every step ended ok. scripts/gpu_check.py has the steps.
#
#     bash scripts/gpu_check.sh --dry-run     # here, on the CPU
#
# proves it before a GPU is at hand: the .whl/ set installs for Python 3.12 (and its packages that
# need no torch import there); the same set, built for this machine's Python, installed into a fresh
# folder and used from a fresh venv holding only what the GPU machine has (its versions of
# transformers, numpy, ... where recorded; torch is the CPU build on this disk), runs every step at
# tiny sizes on the CPU, bf16 included.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}

if [ "${1:-}" != "--dry-run" ]; then
  if [ ! -f .whl/manifest.json ]; then
    echo "no .whl/manifest.json: build the folder with '.venv/bin/python scripts/gpu_wheels.py' and carry .whl" >&2
    exit 2
  fi
  exec python3 scripts/gpu_check.py --mode gpu --out "$OUT" "$@"
fi
shift

VENV_PY=${VENV_PY:-$PWD/.venv/bin/python}
[ -x "$VENV_PY" ] || VENV_PY=/work/main/.venv/bin/python
PY312=${PY312:-}
for candidate in python3.12 /root/.pyenv/versions/3.12*/bin/python3.12; do
  if [ -z "$PY312" ] && "$candidate" -c '' 2>/dev/null; then PY312=$candidate; fi
done
DRY=${DRY:-/tmp/gpu_check_dry}
LOCAL_VERSION=$("$VENV_PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
mkdir -p "$DRY" "$OUT"
# DeepSpeed's CPU all-reduce op is compiled on first use; a folder of its own keeps this venv's build
# apart from other environments' (one shared folder rebuilds it for each torch, under one lock).
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$DRY/torch_extensions}
rm -f "$DRY"/torch_extensions/*/lock  # left by a build that a cap or ^C killed: it would block every next one
step() { printf '\n[dry run] %s (%s)\n' "$1" "$(date -u +%H:%M:%S)"; }

step "1. the .whl/ folder for the GPU machine (Python 3.12), built or brought up to date"
PYTHONPATH=$PWD "$VENV_PY" scripts/gpu_wheels.py || exit 1

step "2. .whl/ installs for Python 3.12; its packages that need no torch import from there alone"
if [ -n "$PY312" ]; then
  rm -rf "$DRY/site312"
  "$PY312" -m pip install -q --no-index --no-deps --no-compile --target "$DRY/site312" .whl/*.whl || exit 1
  PYTHONPATH="$DRY/site312" "$PY312" -S -c '
import importlib, os
site = os.environ["PYTHONPATH"]
for name in ["pydantic", "pydantic_core", "fire", "hjson", "dill", "multiprocess", "termcolor",
             "annotated_types", "typing_inspection", "typing_extensions"]:
    module = importlib.import_module(name)
    assert module.__file__.startswith(site), (name, module.__file__)
    version = getattr(module, "__version__", "")
    print(f"  {name:<18} {version} from {site}")
import pydantic
class Check(pydantic.BaseModel):
    steps: int
print("  pydantic validates on 3.12:", Check(steps="3"))
' || exit 1
else
  echo "  no python3.12 on this machine: the 3.12 install is not checked"
fi

step "3. the same packages built for Python $LOCAL_VERSION (this machine), compared with .whl/"
PYTHONPATH=$PWD "$VENV_PY" scripts/gpu_wheels.py --python-version "$LOCAL_VERSION" --dest "$DRY/whl_local" \
  --no-teacher --budget-mib 1024 || exit 1
"$VENV_PY" -c '
import json, sys
a = json.load(open(".whl/manifest.json"))["packages"]
b = json.load(open(sys.argv[1]))["packages"]
assert a == b, f"the two wheel sets differ: {a} vs {b}"
print(f"  the same {len(a)} packages and versions in both sets")
' "$DRY/whl_local/manifest.json" || exit 1

step "4. a fresh venv standing in for the GPU machine: only packages it has (torch: the CPU build here)"
BASE="$DRY/base"
WANT=$(PYTHONPATH=$PWD "$VENV_PY" scripts/gpu_wheels.py --print-base --python-version "$LOCAL_VERSION" | tr '\n' ' ')
TORCH=$("$VENV_PY" -c 'import torch; print(torch.__version__.split("+")[0])')
if [ "$(cat "$BASE/.requirements" 2>/dev/null)" != "torch==$TORCH $WANT" ]; then
  rm -rf "$BASE"
  "$("$VENV_PY" -c 'import sys; print(sys._base_executable)')" -m venv "$BASE" || exit 1
  "$BASE/bin/python" -m pip install -q "torch==$TORCH" $WANT || exit 1
  echo "torch==$TORCH $WANT" > "$BASE/.requirements"
fi
"$BASE/bin/python" -m pip list --format json | PYTHONPATH=$PWD "$VENV_PY" -c '
import json, sys
sys.path.insert(0, "scripts")
from gpu_wheels import MACHINE_HAS, normalize
names = {normalize(p["name"]): p["version"] for p in json.load(sys.stdin)}
extra = sorted(n for n in names if n not in MACHINE_HAS)
transformers, torch = names.get("transformers"), names.get("torch")
print(f"  {len(names)} packages; transformers {transformers}, torch {torch}")
print("  not in the GPU machine package list:", ", ".join(extra) or "none")
'

step "5. every step of the GPU check, on the CPU at tiny sizes, from the fresh venv and the installed wheels"
"$BASE/bin/python" scripts/gpu_check.py --mode cpu --python "$BASE/bin/python" --wheels "$DRY/whl_local" \
  --teacher "$PWD/.whl/teacher_bf16" --target "$DRY/site" --work "$DRY/work" --out "$OUT" "$@"
