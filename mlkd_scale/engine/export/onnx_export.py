"""Export a Hugging Face encoder directory to ONNX and check it against PyTorch with onnxruntime.

A distilled student is usually served, not trained: as an ONNX graph run by onnxruntime on a CPU
fleet or behind a GPU server. So ``mlkd-scale export --onnx`` (and ``mlkd-scale onnx HF_DIR``)
writes ``model.onnx`` beside the weights, with dynamic batch and sequence axes and the inputs
``input_ids``, ``attention_mask`` and ``token_type_ids`` (the last only for models that take it),
and then *checks* it: the ONNX model and the PyTorch model run on the same inputs, of shapes other
than the one the export traced and with padded rows, and every output must agree within an
absolute tolerance (default :data:`TOLERANCE`). The result (max abs difference per output, shapes,
tolerance, versions, opset) is written to ``onnx_check.json``; an export that fails its check
leaves no ``model.onnx`` behind and ends in one :class:`~mlkd_scale.errors.ExportError`.

Exporter: ``torch.onnx.export(dynamo=True)`` (torch.export + onnxscript). The legacy TorchScript
exporter traces ``forward`` with positional arguments, and transformers 5's ``BertModel.forward``
takes other arguments in third place (``got multiple values for argument 'use_cache'``); the
dynamo exporter takes keyword inputs and declares the dynamic axes as ``torch.export.Dim``, and
it exports SDPA attention as plain ONNX ops, so the model is exported as it runs in PyTorch.

The model class comes from ``architectures`` in ``config.json`` (a transformers class, never
code from the directory), so a sequence-classification, QA or masked-LM student exports with its
head; any other config falls back to ``AutoModel``. onnx, onnxscript and onnxruntime are the
optional extra ``mlkd-scale[onnx]``.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import logging
import math
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors import SafetensorError

from mlkd_scale.engine.export.hf_export import EXPORT_MARKER
from mlkd_scale.engine.export.model_card import with_onnx_section
from mlkd_scale.errors import ExportError

ONNX_FILE = "model.onnx"
CHECK_FILE = "onnx_check.json"
OPSET = 20
#: Absolute tolerance on every output: fp32 ONNX kernels sum in another order than PyTorch's, which
#: moves encoder outputs by ~1e-6; a wrong graph (a fixed shape, a lost mask) moves them by > 1e-2.
TOLERANCE = 1e-4
#: The traced example: neither axis may be 0 or 1, which torch.export would fix as constants.
EXAMPLE_SHAPE = (2, 8)
#: The shapes checked (batch, sequence), unlike the traced one; even rows are padded.
CHECK_SHAPES = ((3, 13), (1, 37))
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
REQUIRED = ("onnx", "onnxscript", "onnxruntime")
INSTALL_HINT = "pip install 'mlkd-scale[onnx]' (or: pip install onnx onnxscript onnxruntime)"


def require_onnx():
    """onnxruntime, after checking that every package the export needs imports; else one ExportError
    naming the missing ones and the pip command, before any model is loaded."""
    missing = []
    for name in REQUIRED:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ExportError(f"ONNX export needs {', '.join(missing)}, which is not installed: {INSTALL_HINT}")
    return importlib.import_module("onnxruntime")


def load_hf_model(hf_dir: str | Path) -> torch.nn.Module:
    """The model of a Hugging Face directory in fp32 and eval mode, as the class its config names
    (so a task head is kept), loaded by transformers without remote code."""
    hf_dir = Path(hf_dir)
    config_file = hf_dir / "config.json"
    if not config_file.is_file():
        raise ExportError(
            f"{hf_dir} is not a Hugging Face model directory: {config_file} is missing; give the folder "
            "that `mlkd-scale export` (or save_pretrained) wrote"
        )
    try:
        config = transformers.AutoConfig.from_pretrained(hf_dir)
        arch = (config.architectures or [None])[0]
        cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
        if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
            cls = transformers.AutoModel
        model = cls.from_pretrained(hf_dir, dtype=torch.float32)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as error:
        raise ExportError(
            f"{hf_dir} cannot be loaded as a model ({type(error).__name__}: "
            f"{str(error).strip().splitlines()[0][:200] if str(error).strip() else 'no message'}); "
            "check its config.json and weight files, or export the checkpoint again"
        ) from None
    return model.float().eval()


def input_names(model: torch.nn.Module) -> list[str]:
    """The standard encoder inputs ``model.forward`` takes, in :data:`INPUT_NAMES` order."""
    params = inspect.signature(model.forward).parameters
    names = [name for name in INPUT_NAMES if name in params]
    if names[:2] != ["input_ids", "attention_mask"]:
        raise ExportError(
            f"{type(model).__name__}.forward does not take input_ids and attention_mask; only "
            "encoder models (BERT-like) are exported to ONNX"
        )
    return names


def example_inputs(config, batch: int, seq: int, names: list[str], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random token ids of shape [batch, seq]; even rows are padded after their first half (a batch
    of unequal sentences, never an empty row), and the second half is segment 1 where there are two."""
    g = torch.Generator().manual_seed(seed)
    vocab = int(config.vocab_size)
    ids = torch.randint(min(1000, vocab // 2), vocab, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[0::2, max(1, seq // 2) :] = 0
    ids[mask == 0] = int(getattr(config, "pad_token_id", None) or 0)
    inputs = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in names:
        types = torch.zeros_like(ids)
        if int(getattr(config, "type_vocab_size", 1)) > 1:
            types[:, seq // 2 :] = 1
        inputs["token_type_ids"] = types
    return inputs


class TensorOutputs(torch.nn.Module):
    """The model with its outputs as a flat tuple of tensors in a fixed order, which is what an
    ONNX graph returns: ``ModelOutput`` fields in order, tuples (hidden states) as ``name.i``."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        return tuple(tensor for _, tensor in _flatten(self.model(**kwargs, return_dict=True)))

    def output_names(self, inputs: dict[str, torch.Tensor]) -> list[str]:
        """Names of what :meth:`forward` returns, found by one forward on ``inputs``."""
        with torch.inference_mode():
            return [name for name, _ in _flatten(self.model(**inputs, return_dict=True))]


def _flatten(output) -> list[tuple[str, torch.Tensor]]:
    flat = []
    for key, value in output.items():
        if isinstance(value, torch.Tensor):
            flat.append((key, value))
        elif isinstance(value, (tuple, list)):
            flat += [(f"{key}.{i}", t) for i, t in enumerate(value) if isinstance(t, torch.Tensor)]
    return flat


@contextlib.contextmanager
def _quiet():
    """The exporter's progress lines and warnings (torchvision ops it skips, axis renames) are
    not the user's concern; errors still propagate."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "onnxscript")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def export_model(model: torch.nn.Module, path: str | Path, opset: int = OPSET) -> list[str]:
    """Write ``model`` (fp32, eval) to the ONNX file ``path`` with dynamic batch and sequence axes;
    returns its output names."""
    require_onnx()
    from torch.export import Dim

    model.eval()
    names = input_names(model)
    wrapper = TensorOutputs(model).eval()
    example = example_inputs(model.config, *EXAMPLE_SHAPE, names)
    outputs = wrapper.output_names(example)
    max_len = int(getattr(model.config, "max_position_embeddings", 0) or 0)
    batch = Dim("batch")
    seq = Dim("sequence", max=max_len) if max_len > EXAMPLE_SHAPE[1] else Dim("sequence")
    try:
        with _quiet():
            program = torch.onnx.export(
                wrapper, (), kwargs=example, dynamic_shapes={n: {0: batch, 1: seq} for n in names},
                input_names=names, output_names=outputs, opset_version=opset, dynamo=True, verbose=False,
            )
            program.save(str(path))
    except Exception as error:  # the exporter raises many types; the user needs which model and why
        first = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
        raise ExportError(
            f"torch.onnx could not export {type(model).__name__} ({type(error).__name__}: {first})"
        ) from error
    return outputs


def open_session(path: str | Path, threads: int | None = None):
    """An onnxruntime CPU session of ``path`` (``threads`` intra-op threads, default onnxruntime's)."""
    ort = require_onnx()
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own Fail/InvalidGraph/NoSuchFile types
        raise ExportError(
            f"{path} cannot be loaded by onnxruntime ({type(error).__name__}: "
            f"{str(error).strip().splitlines()[0][:200]}); export the model again"
        ) from error


def _max_abs_diff(got: np.ndarray, want: np.ndarray) -> float:
    if not (np.isfinite(got).all() and np.isfinite(want).all()):
        return math.inf
    return float(np.abs(got.astype(np.float64) - want.astype(np.float64)).max()) if want.size else 0.0


def compare(model: torch.nn.Module, session, shapes=CHECK_SHAPES) -> dict[str, float]:
    """Max abs difference per output between ``session`` (onnxruntime) and ``model`` (PyTorch) over
    inputs of every (batch, sequence) in ``shapes``; inf where either side is not finite."""
    names = input_names(model)
    graph_inputs = [i.name for i in session.get_inputs()]
    if graph_inputs != names:
        raise ExportError(
            f"the ONNX graph takes {graph_inputs}, the model {names}: it was exported from another model; "
            "export it again"
        )
    wrapper = TensorOutputs(model).eval()
    diffs: dict[str, float] = {}
    for i, (batch, seq) in enumerate(shapes):
        inputs = example_inputs(model.config, batch, seq, names, seed=1 + i)
        with torch.inference_mode():
            want = [t.float().numpy() for t in wrapper(**inputs)]
        got = session.run(None, {k: v.numpy() for k, v in inputs.items()})
        out_names = [o.name for o in session.get_outputs()]
        if len(got) != len(want):
            raise ExportError(f"the ONNX graph returns {len(got)} outputs, the model {len(want)}; export it again")
        for name, g, w in zip(out_names, got, want):
            if tuple(g.shape) != tuple(w.shape):
                raise ExportError(
                    f"ONNX output {name} has shape {tuple(g.shape)} for inputs [{batch}, {seq}], PyTorch "
                    f"{tuple(w.shape)}: the graph's axes are not dynamic; export it again"
                )
            diffs[name] = max(diffs.get(name, 0.0), _max_abs_diff(g, w))
    return diffs


def check_onnx(model: torch.nn.Module, path: str | Path, tolerance: float = TOLERANCE, opset: int = OPSET) -> dict:
    """Run the ONNX file ``path`` and ``model`` on :data:`CHECK_SHAPES` and report (not raise)
    whether every output agrees within ``tolerance``; the report is what ``onnx_check.json`` holds."""
    ort = require_onnx()
    import onnx

    diffs = compare(model, open_session(path))
    worst = max(diffs.values()) if diffs else 0.0
    return {
        "onnx_file": Path(path).name,
        "model_class": type(model).__name__,
        "exporter": "torch.onnx.export(dynamo=True)",
        "opset": opset,
        "inputs": input_names(model),
        "dynamic_axes": {"0": "batch", "1": "sequence"},
        "export_example_shape": list(EXAMPLE_SHAPE),
        "check_shapes": [list(s) for s in CHECK_SHAPES],
        "check_inputs": "random token ids, even rows padded after their first half, segment 1 in the second half",
        "provider": "CPUExecutionProvider",
        "tolerance_abs": tolerance,
        "max_abs_diff": {k: (v if math.isfinite(v) else "non-finite") for k, v in diffs.items()},
        "max_abs_diff_all": worst if math.isfinite(worst) else "non-finite",
        "passed": bool(diffs) and worst <= tolerance,
        "versions": {
            "torch": torch.__version__, "transformers": transformers.__version__,
            "onnx": onnx.__version__, "onnxruntime": ort.__version__,
        },
    }


def export_onnx(
    hf_dir: str | Path, out_dir: str | Path | None = None, tolerance: float = TOLERANCE, opset: int = OPSET
) -> dict:
    """Export the model of ``hf_dir`` to ``out_dir/model.onnx`` (default: ``hf_dir``), check it, and
    write ``onnx_check.json``; raise ExportError (and write no model.onnx) if the check fails.

    Returns the check report; a model card (``README.md`` of an mlkd export) gains an ONNX section.
    """
    require_onnx()
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not tolerance > 0:
        raise ExportError(f"--tolerance: must be a positive number, got {tolerance!r}")
    model = load_hf_model(hf_dir)
    out = Path(out_dir if out_dir is not None else hf_dir)
    if out.exists() and not out.is_dir():
        raise ExportError(f"ONNX output {out} exists and is not a directory; choose a directory")
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".onnx-tmp-"))
    try:
        export_model(model, tmp / ONNX_FILE, opset=opset)
        report = check_onnx(model, tmp / ONNX_FILE, tolerance=float(tolerance), opset=opset)
        report["model_dir"] = str(Path(hf_dir).absolute())
        _write_json(out / CHECK_FILE, report)
        if not report["passed"]:
            worst = max(report["max_abs_diff"], key=lambda k: _as_float(report["max_abs_diff"][k]))
            raise ExportError(
                f"the ONNX export of {hf_dir} differs from the PyTorch model: output {worst} by "
                f"{report['max_abs_diff'][worst]} > tolerance {tolerance:g} (details in {out / CHECK_FILE}); "
                f"{out / ONNX_FILE} was not written"
            )
        for item in tmp.iterdir():  # model.onnx, and model.onnx.data for a model over 2 GB
            os.replace(item, out / item.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _update_card(out, report)
    return report


def _as_float(value) -> float:
    return value if isinstance(value, float) else math.inf


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def _update_card(out: Path, report: dict) -> None:
    """Add the ONNX section to the model card of an mlkd export; other READMEs are not ours to edit."""
    card = out / "README.md"
    if card.is_file() and (out / EXPORT_MARKER).is_file():
        card.write_text(with_onnx_section(card.read_text(), report))
