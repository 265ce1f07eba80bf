"""Run by tests/test_teacher_placement.py through ``deepspeed --num_gpus 2``: a ZeRO-3 teacher vs a replica.

Usage: deepspeed --num_gpus 2 teacher_zero3.py SPEC OUT_DIR
SPEC is a general-distillation spec (its teacher, student, losses and DeepSpeed config are used).
Each rank writes OUT_DIR/rank{r}.json with the parameter bytes it holds under zero3 (and the
whole teacher's), the largest difference between the zero3 teacher's features and the replicated
teacher's on this rank's own batch (in fp32 and in bf16), and between students initialised from
the layers of each.
"""

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from mlkd_scale.engine.distributed import init_distributed
from mlkd_scale.engine.teacher_placement import parameter_bytes, place_teacher
from mlkd_scale.losses import DistillationObjective
from mlkd_scale.models import FeatureTap, build_student, load_teacher
from mlkd_scale.models.student import build_student_config
from mlkd_scale.models.taps import TapRequest
from mlkd_scale.spec import StudentSpec, load_spec
from mlkd_scale.spec.plan import resolve_plan

#: A student as wide as the test teacher, so it can be initialised from teacher layers.
WIDE_STUDENT = StudentSpec(num_layers=2, hidden_size=48, num_heads=3, intermediate_size=96, init="teacher_layers")


def request_for(spec, teacher) -> TapRequest:
    """What the mlkd objective's two stages read from a bare encoder, plus every layer's output."""
    student_config = build_student_config(teacher.config, spec.student)
    stage1 = DistillationObjective(spec.losses, teacher.config, student_config, stage=1).teacher_request()
    layers = frozenset(range(1, teacher.config.num_hidden_layers + 1))
    return stage1.merged(TapRequest(embeddings=True, context_layers=layers, hidden_layers=layers, cls=True))


def flat(features) -> dict[str, torch.Tensor]:
    out = {"embeddings": features.embeddings, "cls": features.cls}
    out.update({f"context{n}": t for n, t in features.context.items()})
    out.update({f"hidden{n}": t for n, t in features.hidden.items()})
    return out


def features(placed, request, batch) -> dict[str, torch.Tensor]:
    with FeatureTap(placed.model, request) as tap, torch.no_grad():
        return {k: v.detach().clone() for k, v in flat(tap(**batch)).items() if v is not None}


def main(spec_path: Path, out: Path) -> None:
    info = init_distributed()
    spec = load_spec(spec_path)
    plan = resolve_plan(spec, info.world_size)
    g = torch.Generator().manual_seed(100 + info.rank)  # each rank its own batch
    input_ids = torch.randint(1000, 2000, (3, 16), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 10:] = 0
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    report = {}
    for dtype in ("fp32", "bf16"):
        teacher_spec = spec.teacher.model_copy(update={"dtype": dtype})
        replica = place_teacher(
            load_teacher(spec.teacher.path, dtype), teacher_spec.model_copy(update={"placement": "replicate"}), plan, info.device
        )
        request = request_for(spec, replica.model)
        expected = features(replica, request, batch)
        zero3 = place_teacher(
            load_teacher(spec.teacher.path, dtype), teacher_spec.model_copy(update={"placement": "zero3"}), plan, info.device
        )
        held_before, full = parameter_bytes(zero3.model)
        got = features(zero3, request, batch)
        got_again = features(zero3, request, batch)  # the second forward runs on the recorded trace
        report[dtype] = {
            "held_bytes": held_before,
            "held_bytes_after_forward": parameter_bytes(zero3.model)[0],
            "full_bytes": full,
            "replica_bytes": parameter_bytes(replica.model)[0],
            "partition_dtypes": sorted({str(p.ds_tensor.dtype) for p in zero3.model.parameters()}),
            "feature_dtypes": sorted({str(t.dtype) for t in got.values()}),
            "keys": sorted(got),
            "max_abs_diff": max((got[k].float() - expected[k].float()).abs().max().item() for k in expected),
            "max_abs_diff_second_forward": max(
                (got_again[k].float() - expected[k].float()).abs().max().item() for k in expected
            ),
            "describe": zero3.describe(),
        }
    # A student initialised from teacher layers copies the same weights from a partitioned teacher.
    copied = {}
    for name, placed in (("replica", replica), ("zero3", zero3)):
        torch.manual_seed(0)
        student = build_student(placed.model, WIDE_STUDENT, [2, 4])
        copied[name] = {k: v.float() for k, v in student.state_dict().items()}
    report["copied_student_max_abs_diff"] = max((copied["zero3"][k] - v).abs().max().item() for k, v in copied["replica"].items())
    # DeepSpeed's default persistence threshold (1e5 elements) keeps small parameters whole on every rank.
    defaults = dataclasses.replace(plan, deepspeed_config={"zero_optimization": {"stage": 2}})
    zero3 = place_teacher(
        load_teacher(spec.teacher.path, "fp32"), spec.teacher.model_copy(update={"placement": "zero3"}), defaults, info.device
    )
    for _ in range(2):  # small parameters stay gathered from the second forward on (the trace is recorded)
        features(zero3, TapRequest(cls=True), batch)
    report["default_threshold_held_after_forward"] = parameter_bytes(zero3.model)[0]
    (out / f"rank{info.rank}.json").write_text(json.dumps(report, indent=1))
    torch.distributed.barrier()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--local_rank", type=int, default=0)  # the launcher adds it; the env has it too
    parser.add_argument("spec", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    main(args.spec, args.out)
