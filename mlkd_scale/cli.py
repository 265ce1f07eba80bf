"""``mlkd-scale`` command line: check a spec before a cluster job, print its schema, export a student.

Commands return None (or exit) so that ``fire`` prints nothing of its own; errors for users are the
:class:`~mlkd_scale.errors.SpecError` lines on stderr with exit status 2, never a traceback.

The spec is light and imported here; a command that needs torch (export, agreement, pretokenize)
imports its modules when it runs, so ``mlkd-scale validate`` and ``schema`` answer in a moment.
"""

from __future__ import annotations

import json
import os
import sys

from mlkd_scale.errors import CheckpointError, DataError, ExportError, SpecError
from mlkd_scale.spec import load_spec, resolve_plan, spec_hash
from mlkd_scale.spec.overrides import schema_text

EXIT_BAD_INPUT = 2


def _fail(message: str) -> None:
    print(message, file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)


def _world_size(world_size: int | None) -> int:
    if world_size is None:
        raw = os.environ.get("WORLD_SIZE", "1")
        try:
            world_size = int(raw)
        except ValueError:
            _fail(f"WORLD_SIZE: {raw!r} is not an integer; unset it or pass --world_size N")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        _fail(f"--world_size: must be a positive integer, got {world_size!r}")
    return world_size


def validate(spec: str, world_size: int | None = None, overrides: list[str] | tuple[str, ...] = ()) -> None:
    """Check SPEC (JSON/YAML) and print the resolved plan; exit 2 with every problem if it is invalid.

    Args:
        spec: Path of the run spec.
        world_size: Ranks the run will use (default: $WORLD_SIZE or 1); the global batch depends on it.
        overrides: ``--set FIELD=VALUE`` edits of the spec (repeatable), checked like the file.
    """
    world_size = _world_size(world_size)
    try:
        run_spec = load_spec(str(spec), world_size=world_size, overrides=_as_list(overrides))
        plan = resolve_plan(run_spec, world_size)
    except SpecError as exc:
        _fail(
            f"{spec}: invalid run spec ({len(exc.problems)} problem{'s' if len(exc.problems) > 1 else ''})\n"
            + "\n".join(f"  {line}" for line in exc.problems)
        )
    print(
        f"spec: {spec} (hash {spec_hash(run_spec)}, run '{run_spec.run.name}' -> {run_spec.run.output_dir})"
    )
    print(plan.summary())


def _as_list(overrides) -> list[str]:
    if isinstance(overrides, str):
        return [overrides]
    if not all(isinstance(o, str) for o in overrides):
        _fail(f"--set: give FIELD=VALUE, got {overrides!r}")
    return list(overrides)


def _gather_sets(argv: list[str]) -> list[str]:
    """``--set A --set B`` (or ``--set=A``) in ``argv`` as one ``--overrides=[A, B]`` that fire reads as a list."""
    rest, sets, i = [], [], 0
    while i < len(argv):
        if argv[i] == "--set" and i + 1 < len(argv):
            sets.append(argv[i + 1])
            i += 2
            continue
        if argv[i].startswith("--set="):
            sets.append(argv[i][len("--set="):])
        else:
            rest.append(argv[i])
        i += 1
    return rest + ([f"--overrides={json.dumps(sets)}"] if sets else [])


def schema() -> None:
    """Print the JSON Schema of a run spec (shipped as mlkd_scale/spec/run_spec.schema.json)."""
    print(schema_text(), end="")


def export(checkpoint: str, out: str, onnx: bool = False) -> None:
    """Write the student of CHECKPOINT (a checkpoint dir or tag dir) to OUT as a Hugging Face directory.

    With --onnx, also OUT/model.onnx, checked against the PyTorch student with onnxruntime
    (OUT/onnx_check.json); needs the extra ``mlkd-scale[onnx]``, looked for before exporting.
    """
    from mlkd_scale.engine.export.hf_export import export_checkpoint

    if onnx:
        _onnx_installed("export --onnx")
    try:
        written = export_checkpoint(str(checkpoint), str(out))
    except (CheckpointError, FileNotFoundError, NotADirectoryError, FileExistsError) as exc:
        _fail(f"export: {exc}")
    print(f"exported the student to {written}")
    if onnx:
        _onnx(written, None, None, "export --onnx")


def onnx(model_dir: str, out: str | None = None, tolerance: float | None = None) -> None:
    """Export the Hugging Face model in MODEL_DIR to OUT/model.onnx (default OUT: MODEL_DIR) with
    dynamic batch and sequence axes, and check it against PyTorch with onnxruntime.

    Args:
        model_dir: A Hugging Face model directory (e.g. what ``mlkd-scale export`` wrote).
        out: Directory for model.onnx and onnx_check.json (default: MODEL_DIR).
        tolerance: Largest max abs difference allowed on any output (default 1e-4).
    """
    _onnx_installed("onnx")
    _onnx(str(model_dir), out, tolerance, "onnx")


def _onnx_installed(command: str) -> None:
    from mlkd_scale.engine.export.onnx_export import require_onnx

    try:
        require_onnx()
    except ExportError as exc:
        _fail(f"{command}: {exc}")


def _onnx(model_dir, out, tolerance, command: str) -> None:
    from mlkd_scale.engine.export.onnx_export import CHECK_FILE, ONNX_FILE, TOLERANCE, export_onnx

    target = out if out is not None else model_dir
    try:
        report = export_onnx(model_dir, out, TOLERANCE if tolerance is None else tolerance)
    except ExportError as exc:
        _fail(f"{command}: {exc}")
    diffs = ", ".join(f"{k} {v:.2e}" for k, v in report["max_abs_diff"].items())
    print(
        f"wrote {os.path.join(target, ONNX_FILE)} (opset {report['opset']}); onnxruntime "
        f"{report['versions']['onnxruntime']} vs PyTorch on {report['check_shapes']}: max abs diff {diffs} "
        f"<= {report['tolerance_abs']:g} ({os.path.join(target, CHECK_FILE)})"
    )


def agreement(teacher: str, student: str, heldout: str, limit: int = 400, seed: int = 0) -> None:
    """Spearman agreement of STUDENT's and TEACHER's sentence similarities on HELDOUT text.

    HELDOUT is a heldout.jsonl (or its directory) from ``python -m mlkd_scale.data.corpus.local_corpus``;
    an untrained student of the same architecture, the teacher's embedding layer alone and a
    TF-IDF bag of words are scored alongside: the references with no context to beat.
    """
    from mlkd_scale.data.corpus.local_corpus import heldout_sentences
    from mlkd_scale.eval.agreement import agreement_report, format_report

    for path, what in ((teacher, "teacher"), (student, "student")):
        if not os.path.isfile(os.path.join(path, "config.json")):
            _fail(f"agreement: {what} {path} is not a Hugging Face model directory (no config.json)")
    sentences = heldout_sentences(heldout, limit=limit)
    if len(sentences) < 3:
        _fail(f"agreement: {heldout} has {len(sentences)} usable sentences; need at least 3")
    print(format_report(agreement_report(teacher, student, sentences, seed=seed)))


def pretokenize(spec: str, out: str | None = None, workers: int | None = None) -> None:
    """Tokenize and pack SPEC's data sources once into OUT (default: the spec's data.pretokenized_dir).

    Train from it with data.pretokenized_dir set. One pass over the corpus, tokenized by WORKERS
    processes (default: every CPU core), packed exactly as streaming packs it.
    """
    from mlkd_scale.data.corpus.pretokenized import write_pretokenized

    try:
        run = load_spec(spec)
    except SpecError as exc:
        _fail(str(exc))
    if run.data is None:
        _fail(f"pretokenize: {spec} has no data section (a task spec?); give a general-distillation spec")
    target = out or run.data.pretokenized_dir
    if not target:
        _fail("pretokenize: give --out DIR or set data.pretokenized_dir in the spec")
    workers = (os.cpu_count() or 1) if workers is None else workers
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        _fail(f"--workers: must be 0 (tokenize in this process) or a positive integer, got {workers!r}")
    try:
        meta = write_pretokenized(run.data, run.teacher.path, target, run.run.seed, workers)
    except DataError as exc:
        _fail(f"pretokenize: {exc}")
    c = meta["counters"]
    print(
        f"wrote {meta['num_sequences']:,} sequences of {meta['max_seq_length']} tokens to {target} in "
        f"{meta['seconds']} s ({c['documents_packed']:,} documents packed, "
        f"{c['documents_skipped']:,} skipped, {c['documents_malformed']:,} of them malformed)"
    )


COMMANDS = {
    "validate": validate,
    "schema": schema,
    "export": export,
    "onnx": onnx,
    "agreement": agreement,
    "pretokenize": pretokenize,
}


def main() -> None:
    """Console-script entry point (``mlkd-scale``)."""
    import fire

    # fire shows help through a pager when stdout is a terminal; a CLI should just print.
    os.environ.setdefault("PAGER", "cat")
    fire.Fire(COMMANDS, command=_gather_sets(sys.argv[1:]), name="mlkd-scale")


if __name__ == "__main__":
    main()
