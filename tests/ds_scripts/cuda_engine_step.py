"""Run by tests/test_cuda.py in its own process: DeepSpeed engine steps of a bf16 distillation on a device.

Usage: python cuda_engine_step.py DEVICE OUT_JSON   (DEVICE: cuda, or cpu for the CPU dry run)

Its own process because DeepSpeed keeps its accelerator and process group in module globals: the
test session's CPU group (conftest's ``world``) must not decide the device here. The models, the
engine (spec -> plan -> DeepSpeed config, the project's AdamW) and the step are the benchmarks'
(benchmarks/common.py), on the tiny shapes. Writes what the test checks: the device and dtype the
engine trains in, the loss terms of each step, how far the student moved, whether the teacher did.
"""

import json
import os
import sys
from pathlib import Path

DEVICE, OUT = sys.argv[1], Path(sys.argv[2])
if DEVICE == "cpu":
    os.environ["DS_ACCELERATOR"] = "cpu"
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import torch
from common import build_models, make_batch, make_engine, quiet_libraries

from mlkd_scale.engine.distributed import init_distributed
from mlkd_scale.models import FeatureTap
from mlkd_scale.models.distillation_module import MODEL_INPUTS, DistillationModule

quiet_libraries()
dist = init_distributed()
torch.manual_seed(0)
teacher, student, objective = build_models("tiny", dist.device, "bf16")
teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
tap = FeatureTap(teacher, objective.teacher_request())
engine = make_engine(DistillationModule(student, objective), 4, 16, "bf16", 0, dist.world_size)
student_before = {k: v.detach().float().clone() for k, v in engine.module.student.named_parameters()}
batch = {k: v for k, v in make_batch(4, 16, dist.device, teacher.config.vocab_size, pad=True).items()
         if k in MODEL_INPUTS}
steps = []
for _ in range(3):
    with torch.no_grad():
        features = tap(**batch)
    total, terms = engine(batch, features)
    engine.backward(total)
    engine.step()
    steps.append({"total": total.item(), **{k: v.item() for k, v in terms.items()}})
moved = max((p.detach().float() - student_before[k]).abs().max().item()
            for k, p in engine.module.student.named_parameters())
teacher_same = all(torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items())
OUT.write_text(json.dumps({
    "device": str(dist.device),
    "param_device": str(next(engine.module.parameters()).device),
    "param_dtype": str(next(engine.module.student.parameters()).dtype),
    "teacher_dtype": str(next(teacher.parameters()).dtype),
    "steps": steps,
    "global_steps": engine.global_steps,
    "student_moved": moved,
    "teacher_unchanged": teacher_same,
}))
tap.remove()
torch.distributed.destroy_process_group()
