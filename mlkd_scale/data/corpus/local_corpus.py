"""A small, license-clean English corpus built from text already on the machine: stdlib docstrings.

The quick-start and the tests need real English prose without a download. The docstrings of
Python's standard-library modules, classes and functions are exactly that, ship with every Python
(PSF license) and are the same on every machine with the same Python build.

    python -m mlkd_scale.data.corpus.local_corpus OUT_DIR

writes ``OUT_DIR/train.jsonl`` and ``OUT_DIR/heldout.jsonl`` (about 95 / 5 %, split by a hash of
the text), one ``{"id": "<dotted name>", "text": ...}`` per line, and prints their sizes. The output
is deterministic: modules, members and documents are visited in sorted order, and the same Python
gives the same bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import io
import json
import os
import pkgutil
import re
import sys
import warnings
from collections.abc import Iterable, Iterator

# Modules that must not be imported (GUI, browser, printing, caches written to disk, setuptools
# shims that differ between environments) or that are tests/demos rather than documentation.
SKIP_MODULES = frozenset(
    ["antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "tests", "lib2to3", "distutils", "ensurepip", "readline", "rlcompleter", "pydoc_data", "encodings", "msilib", "winreg", "winsound", "msvcrt", "nt", "site", "sitecustomize", "usercustomize"]
)
MIN_CHARS = 200
HELDOUT_EVERY = 20  # 1 document in 20 (5 %) goes to heldout.jsonl

_DOCTEST_LINE = re.compile(r"^\s*(>>>|\.\.\.)(\s|$)")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\"'])")


def _skipped(name: str) -> bool:
    parts = name.split(".")
    return parts[0] in SKIP_MODULES or any(p.startswith("_") or p in SKIP_MODULES for p in parts)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence warnings and stray prints while importing arbitrary stdlib modules."""
    with (
        warnings.catch_warnings(),
        contextlib.redirect_stdout(io.StringIO()),
        contextlib.redirect_stderr(io.StringIO()),
    ):
        warnings.simplefilter("ignore")
        yield


def _import(name: str):
    try:
        with _quiet():
            return importlib.import_module(name)
    except (Exception, SystemExit):  # platform-specific or broken modules are simply left out
        return None


def iter_modules(roots: Iterable[str] | None = None) -> Iterator:
    """Importable public stdlib modules (and their public submodules), in sorted order."""
    roots = sorted(sys.stdlib_module_names) if roots is None else list(roots)
    for name in roots:
        if _skipped(name):
            continue
        module = _import(name)
        if module is None:
            continue
        yield module
        path = getattr(module, "__path__", None)
        if path:
            subs = sorted(f"{name}.{info.name}" for info in pkgutil.iter_modules(path))
            yield from iter_modules([s for s in subs if not s.endswith(".__main__")])


def normalise(doc: str) -> str:
    """Drop doctest prompt lines and collapse whitespace: corpus text is prose, one line."""
    lines = [line for line in doc.splitlines() if not _DOCTEST_LINE.match(line)]
    return " ".join(" ".join(lines).split())


def _documented(module) -> Iterator[tuple[str, object]]:
    """``(dotted name, object)`` for the module, its own public classes and functions, and their methods."""
    yield module.__name__, module
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        yield f"{module.__name__}.{name}", obj
        if inspect.isclass(obj):
            for attr, member in sorted(vars(obj).items()):
                if attr.startswith("_"):
                    continue
                if isinstance(member, (classmethod, staticmethod)):
                    member = member.__func__
                if inspect.isroutine(member) or isinstance(member, property):
                    yield f"{module.__name__}.{name}.{attr}", member


def collect_docstrings(
    modules: Iterable[str] | None = None, min_chars: int = MIN_CHARS
) -> list[tuple[str, str]]:
    """Deduplicated ``(id, text)`` docstrings of at least ``min_chars`` characters after normalising.

    ``modules`` limits the walk to those roots (and their submodules); None walks the whole stdlib.
    """
    seen: set[str] = set()
    docs = []
    for module in iter_modules(modules):
        for name, obj in _documented(module):
            try:
                raw = inspect.getdoc(obj)
            except Exception:
                continue
            if not raw:
                continue
            text = normalise(raw)
            if len(text) >= min_chars and text not in seen:
                seen.add(text)
                docs.append((name, text))
    return docs


def is_heldout(text: str) -> bool:
    """Stable 1-in-HELDOUT_EVERY split by content hash (independent of order and of PYTHONHASHSEED)."""
    return int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:4], "big") % HELDOUT_EVERY == 0


def _write(path: str, docs: list[tuple[str, str]]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(json.dumps({"id": doc_id, "text": text}, ensure_ascii=False) + "\n" for doc_id, text in docs)


def _sizes(docs: list[tuple[str, str]]) -> dict:
    return {
        "documents": len(docs),
        "characters": sum(len(t) for _, t in docs),
        "words": sum(len(t.split()) for _, t in docs),
    }


def build_corpus(out_dir: str, modules: Iterable[str] | None = None, min_chars: int = MIN_CHARS) -> dict:
    """Write ``train.jsonl`` and ``heldout.jsonl`` into ``out_dir``; return their sizes."""
    docs = collect_docstrings(modules, min_chars)
    if not docs:
        raise ValueError(f"no docstrings of >= {min_chars} characters found in modules {modules}")
    train = [d for d in docs if not is_heldout(d[1])]
    heldout = [d for d in docs if is_heldout(d[1])]
    os.makedirs(out_dir, exist_ok=True)
    _write(os.path.join(out_dir, "train.jsonl"), train)
    _write(os.path.join(out_dir, "heldout.jsonl"), heldout)
    return {"train": _sizes(train), "heldout": _sizes(heldout)}


def _is_prose(sentence: str) -> bool:
    """Mostly plain words: drops ASCII-art tables, signatures and code fragments."""
    words = sentence.split()
    plain = sum(w.strip(".,;:!?()\"'").isalpha() for w in words)
    return plain >= 0.7 * len(words)


def heldout_sentences(
    path: str, min_words: int = 8, max_words: int = 60, limit: int | None = None
) -> list[str]:
    """Sentences of ``min_words``..``max_words`` words from the held-out documents, in file order.

    ``path`` is ``heldout.jsonl`` or the corpus directory. Meant for a similarity-agreement check
    between teacher and student on text neither was trained on.
    """
    if os.path.isdir(path):
        path = os.path.join(path, "heldout.jsonl")
    sentences = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            for sentence in _SENTENCE_END.split(json.loads(line)["text"]):
                if min_words <= len(sentence.split()) <= max_words and _is_prose(sentence):
                    sentences.append(sentence)
                    if limit is not None and len(sentences) >= limit:
                        return sentences
    return sentences


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m mlkd_scale.data.corpus.local_corpus OUT_DIR", file=sys.stderr)
        return 2
    sizes = build_corpus(argv[0])
    for split, s in sizes.items():
        print(
            f"{split}: {s['documents']} documents, {s['characters']} characters, "
            f"~{s['words']} tokens (words) -> {os.path.join(argv[0], split + '.jsonl')}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
