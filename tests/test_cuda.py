"""The CUDA paths: a bf16 teacher's forward, selective attention beside SDPA, DeepSpeed engine steps.

Skipped without a CUDA GPU. ``scripts/gpu_check.sh`` runs this file on the GPU machine; its CPU dry
run sets ``MLKD_CUDA_TESTS_ON_CPU=1`` so the same checks run on the CPU (bf16 included), which
proves the tests themselves before a GPU is at hand.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_taps import tapped_layer_2_beside_eager
from tiny_models import tiny_batch, tiny_teacher

from mlkd_scale.models import FeatureTap, TapRequest, load_teacher

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("MLKD_CUDA_TESTS_ON_CPU") == "1":
        return "cpu"
    pytest.skip("needs a CUDA GPU (MLKD_CUDA_TESTS_ON_CPU=1 runs these checks on the CPU)")


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_bf16_teacher_forward_matches_fp32(tmp_path, device):
    """The teacher as a run loads it (load_teacher, bf16) agrees with its fp32 forward on the device,
    and the device's fp32 forward with the CPU's."""
    tiny_teacher().save_pretrained(tmp_path / "teacher")
    fp32 = load_teacher(str(tmp_path / "teacher"), "fp32").to(device)
    bf16 = load_teacher(str(tmp_path / "teacher"), "bf16").to(device)
    cpu = load_teacher(str(tmp_path / "teacher"), "fp32")
    batch = tiny_batch()
    request = TapRequest(embeddings=True, context_layers=frozenset({2}), hidden_layers=frozenset({1, 4}))
    with torch.no_grad(), FeatureTap(fp32, request) as tap32, FeatureTap(bf16, request) as tap16:
        on_device = {k: v.to(device) for k, v in batch.items()}
        ref, low = tap32(**on_device), tap16(**on_device)
        out_cpu = cpu(**batch).last_hidden_state
    assert next(bf16.parameters()).dtype == torch.bfloat16 and low.hidden[4].dtype == torch.bfloat16
    assert next(bf16.parameters()).device.type == device
    real = batch["attention_mask"].bool().to(device)
    for name, a, b in [("embeddings", low.embeddings, ref.embeddings), ("context 2", low.context[2], ref.context[2]),
                       ("hidden 1", low.hidden[1], ref.hidden[1]), ("hidden 4", low.hidden[4], ref.hidden[4])]:
        assert torch.isfinite(a).all(), name
        assert _relative_error(a[real], b[real]) < 2e-2, name  # bf16 keeps 8 bits of mantissa
    torch.testing.assert_close(ref.hidden[4].cpu(), out_cpu, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_selective_attention_beside_sdpa(device, dtype):
    """A tapped layer returns eager attention's maps; the others run SDPA on the device."""
    model, reference = tiny_teacher().to(device, dtype), tiny_teacher().to(device, dtype)
    batch = {k: v.to(device) for k, v in tiny_batch().items()}
    feats, ref = tapped_layer_2_beside_eager(model, reference, batch)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(feats.attentions[2], ref.attentions[1], rtol=tol, atol=tol)
    torch.testing.assert_close(feats.attentions[2].float().sum(-1), torch.ones(4, 12, 12, device=device),
                               rtol=tol, atol=tol)
    real = batch["attention_mask"].bool()
    assert _relative_error(feats.hidden[4][real], ref.hidden_states[4][real]) < (1e-5 if tol == 1e-5 else 3e-2)
    assert model.config._attn_implementation == "sdpa"


def test_deepspeed_engine_steps_in_bf16(tmp_path, device):
    """Three steps of our DeepSpeed engine (bf16, ZeRO-0) on the device: finite losses, the student
    moves, the teacher does not."""
    out = tmp_path / "steps.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "ds_scripts" / "cuda_engine_step.py"), device, str(out)],
                          check=False, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["device"].startswith(device) and result["param_device"].startswith(device)
    assert result["param_dtype"] == result["teacher_dtype"] == "torch.bfloat16"
    assert result["global_steps"] == 3 and len(result["steps"]) == 3
    assert all(torch.isfinite(torch.tensor(list(step.values()))).all() for step in result["steps"])
    assert all(step["total"] > 0 for step in result["steps"])
    assert result["student_moved"] > 0 and result["teacher_unchanged"]
