"""L_SS and L_SC over the global batch: 2 gloo ranks × b samples give the loss and (averaged) gradients
of 1 rank × 2b samples; ``losses.batch_relations: local`` gives each rank's own relation instead.

The 2 ranks are processes started with ``torch.multiprocessing.spawn`` (a gloo group over a file
store); each runs the real :class:`DistillationObjective` on tiny models and averages its gradients
over the ranks as DeepSpeed's data parallelism does.
"""

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tiny_models import tiny_batch, tiny_teacher

from mlkd_scale.losses import DistillationObjective
from mlkd_scale.losses.batch_gather import gather_batch
from mlkd_scale.models import FeatureTap, build_student
from mlkd_scale.spec import LossesSpec, StudentSpec

WORLD = 2
LABELS = torch.tensor([0, 1, 2, 0, 1, 2])  # every label on both ranks: positives across ranks
EQUAL = (range(3), range(3, 6))
UNEVEN = (range(4), range(4, 6))  # an epoch's last, smaller micro batch on rank 1
CASES = {  # name: (loss weights, batch_relations, rows of each rank, train.compile 'objective')
    "ss": ({"ss": 1.0, "sc": 0.0, "kd": 0.0}, "global", EQUAL, False),
    "sc": ({"ss": 0.0, "sc": 1.0, "kd": 0.0}, "global", EQUAL, False),
    "uneven": ({"kd": 0.0}, "global", UNEVEN, False),
    "compiled": ({"kd": 0.0}, "global", UNEVEN, True),
    "local": ({"kd": 0.0}, "local", EQUAL, False),
}


def _loss_and_grads(case: str, rows) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The objective's total on ``rows`` of the batch and the gradient of every trained parameter."""
    weights, relations, _, compiled = CASES[case]
    teacher = tiny_teacher(with_head=True, num_labels=3)
    torch.manual_seed(1)
    student = build_student(
        teacher, StudentSpec(num_layers=2, hidden_size=24, num_heads=3, intermediate_size=40), [2, 4]
    ).eval()  # no dropout: the same samples must give the same vectors on 1 and 2 ranks
    losses = LossesSpec(weights=weights, batch_relations=relations)
    objective = DistillationObjective(losses, teacher.config, student.config, stage=2)
    if compiled:  # the gather runs eagerly between the compiled graphs
        objective.compile()
    batch = {k: v[list(rows)] for k, v in tiny_batch(batch=6).items()}
    with torch.no_grad(), FeatureTap(teacher, objective.teacher_request()) as t_tap:
        t_feats = t_tap(**batch)
    with FeatureTap(student, objective.student_request()) as s_tap:
        s_feats = s_tap(**batch)
    total, _ = objective(t_feats, s_feats, batch["attention_mask"], LABELS[list(rows)])
    total.backward()
    named = [*student.named_parameters(prefix="student"), *objective.named_parameters(prefix="objective")]
    return total.detach(), {name: p.grad for name, p in named if p.grad is not None}


def _gather_check(rank: int) -> dict:
    """gather_batch on rows of different sizes: the values, and the gradient of a weighted sum."""
    x = (torch.arange(3.0 - 2 * rank) + 10 * rank)[:, None].repeat(1, 2).requires_grad_()
    gathered, nothing = gather_batch(x, None)
    weights = torch.arange(gathered.numel(), dtype=torch.float32).reshape(gathered.shape)
    (gathered * weights).sum().backward()
    return {"gathered": gathered.detach(), "nothing": nothing, "grad": x.grad}


def _rank_main(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        results: dict = {"gather": _gather_check(rank)}
        for case, (_, _, split, _) in CASES.items():
            loss, grads = _loss_and_grads(case, split[rank])
            for grad in grads.values():  # what DeepSpeed does with data-parallel gradients
                dist.all_reduce(grad)
                grad /= WORLD
            results[case] = (loss, grads)
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """Every case's results on each of the 2 ranks (one spawn for the whole module)."""
    out = tmp_path_factory.mktemp("batch_relations")
    mp.spawn(_rank_main, args=(str(out / "store"), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _assert_grads_close(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(actual[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("case", ["ss", "sc", "uneven", "compiled"])
def test_global_relation_on_two_ranks_equals_one_rank_on_the_whole_batch(ranks, case):
    loss, grads = _loss_and_grads("uneven" if case == "compiled" else case, range(6))  # eager reference
    for rank in range(WORLD):
        rank_loss, rank_grads = ranks[rank][case]
        torch.testing.assert_close(rank_loss, loss, rtol=1e-5, atol=1e-6)
        _assert_grads_close(rank_grads, grads)
    student_grads = [name for name in grads if name.startswith("student.")]
    assert student_grads and all(grads[name].abs().sum() > 0 for name in student_grads[-4:])
    if case != "ss":  # L_SC trains the last layer's projection W_h through the gather
        assert grads["objective.projections.1.weight"].abs().sum() > 0


def test_local_relation_is_each_ranks_own_and_differs_from_global(ranks):
    per_rank = [_loss_and_grads("local", rows) for rows in EQUAL]
    for rank, (loss, _) in enumerate(per_rank):
        torch.testing.assert_close(ranks[rank]["local"][0], loss)
    mean_grads = {name: (per_rank[0][1][name] + per_rank[1][1][name]) / WORLD for name in per_rank[0][1]}
    _assert_grads_close(ranks[0]["local"][1], mean_grads)
    global_loss, _ = _loss_and_grads("local", range(6))  # the whole batch in one relation
    assert all(abs(loss.item() - global_loss.item()) > 1e-3 for loss, _ in per_rank)


def test_gather_concatenates_uneven_rows_and_sums_gradients_into_each_ranks_own(ranks):
    expected = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [10.0, 10.0]])
    weights = torch.arange(8.0).reshape(4, 2)
    own_rows = (slice(0, 3), slice(3, 4))
    for rank in range(WORLD):
        result = ranks[rank]["gather"]
        torch.testing.assert_close(result["gathered"], expected)
        assert result["nothing"] is None
        torch.testing.assert_close(result["grad"], WORLD * weights[own_rows[rank]])


def test_gather_is_the_identity_on_one_process():
    x, labels = torch.randn(3, 4, requires_grad=True), torch.tensor([0, 1, 0])
    assert not dist.is_initialized() or dist.get_world_size() == 1
    out = gather_batch(x, labels, None)
    assert out[0] is x and out[1] is labels and out[2] is None
