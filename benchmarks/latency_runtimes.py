"""onnxruntime as a second runtime of the head-count study (``inference_heads.py --runtimes``).

Each head-count variant is exported to ONNX in a temporary directory by
:mod:`mlkd_scale.engine.export.onnx_export` (the graph ``mlkd-scale export --onnx`` writes: fp32, dynamic
batch and sequence), checked against its own PyTorch model, and called through an onnxruntime CPU
session on the same token ids as the PyTorch model of the cell, with as many intra-op threads as
torch uses, so the two runtimes are compared on the same work and the same cores.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from heads_models import Student, build_variant

RUNTIMES = ("torch", "onnxruntime")
#: The (batch, sequence) of the check of each exported variant against PyTorch (padded rows included).
CHECK_SHAPE = (2, 16)


@dataclass
class OnnxVariants:
    """One onnxruntime session per head count, and how each exported graph matched PyTorch."""

    sessions: dict[int, object]
    max_abs_diff: dict[int, float]
    tolerance: float
    export_s: float
    _tmp: tempfile.TemporaryDirectory = field(repr=False)

    def close(self) -> None:
        """Drop the sessions and the temporary ONNX files."""
        self.sessions.clear()
        self._tmp.cleanup()


def export_variants(
    student: Student, heads: list[int], attn: str, threads: int, log: Callable[[str], None] = print
) -> OnnxVariants:
    """Export the fp32 ``h``-head variant of ``student`` for every ``h`` to ONNX, open it in
    onnxruntime and check it against PyTorch; raise if any output differs by more than the
    export's tolerance (the timing would then compare different computations)."""
    from mlkd_scale.engine.export import onnx_export as ox

    ox.require_onnx()
    tmp = tempfile.TemporaryDirectory(prefix="inference_heads_onnx_")
    sessions, diffs = {}, {}
    started = time.perf_counter()
    try:
        for h in heads:
            model = build_variant(student, h, attn, "cpu", torch.float32)
            path = Path(tmp.name) / f"heads{h}.onnx"
            ox.export_model(model, path)
            sessions[h] = ox.open_session(path, threads=threads)
            diffs[h] = max(ox.compare(model, sessions[h], shapes=(CHECK_SHAPE,)).values())
            if not diffs[h] <= ox.TOLERANCE:
                raise RuntimeError(
                    f"the {h}-head ONNX graph differs from its PyTorch model by {diffs[h]:.2e} > {ox.TOLERANCE:g}"
                )
    except BaseException:
        tmp.cleanup()
        raise
    seconds = time.perf_counter() - started
    shown = ", ".join(f"{h}h {d:.1e}" for h, d in diffs.items())
    log(
        f"onnxruntime: exported {len(heads)} head counts to ONNX (opset {ox.OPSET}) in {seconds:.0f} s; "
        f"max abs diff vs PyTorch on [{CHECK_SHAPE[0]}, {CHECK_SHAPE[1]}] padded inputs: {shown} "
        f"(tolerance {ox.TOLERANCE:g}); {threads} intra-op threads"
    )
    return OnnxVariants(sessions, diffs, ox.TOLERANCE, seconds, tmp)


def onnx_call(session, inputs: dict[str, torch.Tensor]) -> Callable[[], torch.Tensor]:
    """One onnxruntime forward on ``inputs`` (converted to numpy once, outside the timed call),
    returning the first output as PyTorch's forward does; ``token_type_ids`` the graph takes and
    ``inputs`` lack are zeros, which is what BERT uses without them."""
    feed = {}
    for graph_input in session.get_inputs():
        name = graph_input.name
        if name in inputs:
            feed[name] = inputs[name].detach().cpu().numpy()
        elif name == "token_type_ids":
            feed[name] = torch.zeros_like(inputs["input_ids"]).cpu().numpy()
        else:
            raise ValueError(f"the ONNX graph needs input {name!r}, which the study does not make")

    def call() -> torch.Tensor:
        return torch.from_numpy(session.run(None, feed)[0])

    return call
