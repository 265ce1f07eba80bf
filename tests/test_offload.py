"""ZeRO-Offload of the student's optimizer: DeepSpeed's CPU Adam is built when the DeepSpeed config
offloads it, and 2-rank runs with ds_configs/zero{2,3}_offload.json finish, checkpoint, resume step
for step and export a student that AutoModel loads (through the real deepspeed launcher)."""

import pytest
import torch
from run_fixtures import check_ok, make_spec, run_launcher
from transformers import AutoModel

from mlkd_scale.engine.checkpoints.manager import read_complete
from mlkd_scale.engine.schedule import build_optimizer, offloads_optimizer
from mlkd_scale.engine.trackers import read_scalars
from mlkd_scale.spec import RunSpec, SpecError, TrainSpec
from mlkd_scale.spec.plan import resolve_plan


def _spec(deepspeed: dict | str, **train) -> RunSpec:
    return RunSpec(teacher={"path": "t"}, data={"sources": [{"path": "d"}]}, train={"max_steps": 3, **train},
                   deepspeed={"config": deepspeed})


@pytest.mark.parametrize(
    ("config", "offloaded"),
    [
        ("zero2_offload.json", True),
        ("zero3_offload.json", True),
        ("zero3.json", False),
        ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "nvme", "nvme_path": "/tmp"}}}, True),
        ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "none"}}}, False),
        ({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}, False),
    ],
)
def test_offloads_optimizer_reads_the_resolved_config(config, offloaded):
    assert offloads_optimizer(resolve_plan(_spec(config), 2).deepspeed_config) is offloaded


@pytest.mark.parametrize(
    ("zero", "message"),
    [
        ({"stage": 0, "offload_optimizer": {"device": "cpu"}}, "offload_optimizer but the ZeRO stage is 0"),
        ({"stage": 2, "offload_param": {"device": "cpu"}}, "offload_param but the ZeRO stage is 2"),
    ],
)
def test_offload_at_a_stage_that_cannot_honour_it_is_a_spec_error(zero, message):
    with pytest.raises(SpecError, match=message):
        resolve_plan(_spec({"zero_optimization": zero}), 2)


def test_cpu_offload_builds_deepspeed_cpu_adam_with_the_same_groups():
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    module = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    train = TrainSpec(max_steps=10, lr=3e-4, weight_decay=0.05, adam_betas=(0.8, 0.9), adam_eps=1e-7)
    plain, _ = build_optimizer(module, train, 10, 2)
    offload, scheduler = build_optimizer(module, train, 10, 2, cpu_offload=True)
    assert type(plain) is torch.optim.AdamW and isinstance(offload, DeepSpeedCPUAdam) and offload.adam_w_mode
    for a, b in zip(plain.param_groups, offload.param_groups, strict=True):
        assert [id(p) for p in a["params"]] == [id(p) for p in b["params"]]
        assert (a["weight_decay"], a["lr"], a["betas"], a["eps"]) == (b["weight_decay"], b["lr"], b["betas"], b["eps"])
    assert [g["weight_decay"] for g in offload.param_groups] == [0.05, 0.0]  # no decay on biases / LayerNorm
    # one step of each from the same gradients: the same AdamW update
    for p in module.parameters():
        p.grad = torch.full_like(p, 0.5)
    before = [p.detach().clone() for p in module.parameters()]
    offload.step()
    after_offload = [p.detach().clone() for p in module.parameters()]
    with torch.no_grad():
        for p, b in zip(module.parameters(), before, strict=True):
            p.copy_(b)
    plain.step()
    for a, b in zip(after_offload, module.parameters(), strict=True):
        torch.testing.assert_close(a, b.detach(), rtol=1e-6, atol=1e-7)
    assert scheduler.get_last_lr()[0] == pytest.approx(3e-4 / 2)  # warm-up step 1 of 2


@pytest.mark.launcher
@pytest.mark.parametrize(("config", "stage"), [("zero2_offload.json", 2), ("zero3_offload.json", 3)])
def test_offload_run_resumes_step_for_step_and_exports(tmp_path, assets, config, stage):
    teacher, corpus = assets

    def spec_in(name):
        directory = tmp_path / name
        directory.mkdir()
        return make_spec(directory, teacher, corpus, train__zero_stage=stage, deepspeed__config=config,
                         train__max_steps=4, checkpoint__every_n_steps=2)

    check_ok(run_launcher(spec_in("straight")))
    spec = spec_in("resumed")
    first = check_ok(run_launcher(spec, "--stop_after_steps", "2"))
    assert "stopped (resumable) at step 2" in first.stdout
    second = check_ok(run_launcher(spec))
    assert "resumed from" in second.stdout and "step00000002" in second.stdout

    straight, resumed = tmp_path / "straight" / "out", tmp_path / "resumed" / "out"
    expected = [v for _, v in read_scalars(straight / "tensorboard")["loss/total"]]
    got = [v for _, v in read_scalars(resumed / "tensorboard")["loss/total"]]
    assert len(expected) == len(got) == 4
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)

    tag = resumed / "checkpoints" / "step00000004"
    assert read_complete(tag)["world_size"] == 2
    assert len(list(tag.glob("*optim_states.pt"))) == 2, "optimizer state sharded over both ranks"
    students = [AutoModel.from_pretrained(out / "student") for out in (straight, resumed)]
    assert (students[0].config.num_hidden_layers, students[0].config.hidden_size) == (2, 24)
    torch.testing.assert_close(students[1].state_dict(), students[0].state_dict(), rtol=1e-5, atol=1e-6)
