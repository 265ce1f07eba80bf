"""The shape of the code base (design guide): small modules, short functions, no import cycles, a
spec that stays a leaf, thin launchers. Read statically with ``ast``, so these tests are fast."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mlkd_scale"
CODE = [p for folder in ("mlkd_scale", "launchers", "benchmarks", "scripts") for p in (ROOT / folder).rglob("*.py")]
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80
MAX_LAUNCHER_LINES = 50


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def test_no_module_over_400_lines() -> None:
    long = {str(p.relative_to(ROOT)): n for p in CODE if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_no_function_over_80_lines() -> None:
    long = {}
    for path in CODE:
        for node in ast.walk(_tree(path)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long[f"{path.relative_to(ROOT)}:{node.name}"] = length
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_launchers_are_thin() -> None:
    long = {p.name: n for p in (ROOT / "launchers").glob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LAUNCHER_LINES}
    assert not long, f"launchers over {MAX_LAUNCHER_LINES} lines: {long}"


def _package_imports(path: Path) -> tuple[set[str], list[str]]:
    """The mlkd_scale modules ``path`` imports at run time (not under TYPE_CHECKING), and the ones it
    imports inside a function."""
    tree = _tree(path)
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    module = _module_name(path)
    found, nested = set(), []
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    inside = {id(n) for f in functions for n in ast.walk(f)}
    for node in ast.walk(tree):
        if id(node) in skip or not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                base = ".".join(module.split(".")[: -node.level] + ([base] if base else []))
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            names = [alias.name for alias in node.names]
        for name in names:
            if name.startswith("mlkd_scale"):
                target = _resolve(name)
                if target and target != module:
                    found.add(target)
                    if id(node) in inside:
                        nested.append(target)
    return found, nested


def _resolve(dotted: str) -> str | None:
    """The module a dotted import name refers to (``mlkd_scale.spec.RunSpec`` -> ``mlkd_scale.spec``)."""
    parts = dotted.split(".")
    while parts:
        path = ROOT.joinpath(*parts)
        if path.with_suffix(".py").is_file() or (path / "__init__.py").is_file():
            return ".".join(parts)
        parts.pop()
    return None


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _package_imports(p)[0] for p in PACKAGE.rglob("*.py")}


def test_no_import_cycles() -> None:
    graph = _graph()
    # a package's __init__ re-exporting its own submodules is not a cycle of the code's layers
    for name, targets in graph.items():
        graph[name] = {t for t in targets if not (t.startswith(name + ".") and (PACKAGE.parent / Path(*name.split("."))).is_dir())}
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target):] + [target] if target in stack else [node, target])
            elif target not in state:
                visit(target, [*stack, target])
        state[node] = "done"

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


#: The command line imports a command's torch-heavy modules when that command runs (``validate`` and
#: ``schema`` answer without torch); nothing else imports a package module inside a function.
DEFERRED_BY_DESIGN = {"mlkd_scale/cli.py": ("mlkd_scale.engine.", "mlkd_scale.data.", "mlkd_scale.eval.")}


def test_no_package_import_inside_a_function() -> None:
    nested = {}
    for path in [*PACKAGE.rglob("*.py"), *(ROOT / "launchers").glob("*.py")]:
        allowed = DEFERRED_BY_DESIGN.get(str(path.relative_to(ROOT)), ())
        found = [m for m in _package_imports(path)[1] if not (allowed and m.startswith(allowed))]
        if found:
            nested[str(path.relative_to(ROOT))] = sorted(set(found))
    assert not nested, f"mlkd_scale modules imported inside functions (hidden cycles or slow paths): {nested}"


def test_the_spec_is_a_leaf() -> None:
    """Loading the spec package (and so validating a task name) imports no heavy library and no task
    code beyond the name tables."""
    code = (
        "import sys, mlkd_scale.spec; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'datasets', 'transformers', "
        "'deepspeed', 'numpy') or m.startswith(('mlkd_scale.engine', 'mlkd_scale.data', 'mlkd_scale.models', "
        "'mlkd_scale.losses', 'mlkd_scale.eval'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.parametrize("name", ["mlkd_scale/errors.py"])
def test_user_facing_errors_live_in_one_module(name: str) -> None:
    """Every exception class a user may see is defined in mlkd_scale/errors.py."""
    user_facing = {"SpecError", "DataError", "CheckpointError", "SquadDataError", "AugmentCacheError",
                   "AugmentInputError", "ExportError"}
    defined = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.ClassDef) and node.name in user_facing:
                defined.setdefault(node.name, []).append(str(path.relative_to(ROOT)))
    assert defined == {cls: [name] for cls in user_facing}
