"""One stage of a task run (teacher fine-tuning, Stage 1 or Stage 2) on DeepSpeed.

A stage is a budget of optimizer steps over an encoded train split, with dev evaluation, its own
checkpoint directory and TensorBoard tags, and exact resume. Reading order: :class:`StageSetup`
is what the caller decides (what is trained and its loss); :class:`TaskStage` builds the engine,
the batch source (:class:`SampledBatches`) and the evaluator (:class:`DevEvaluator`) and runs them
with the one :class:`~mlkd_scale.engine.stage_runner.StageRunner`. Layout under
``<run.output_dir>/<stage>/``::

    checkpoints/     CheckpointManager's directory (or <checkpoint.dir>/<stage>); best.json pins
                     the checkpoint best on dev against keep_last pruning
    result.json      written once the stage finished: steps, best and final checkpoint, metrics;
                     a relaunch skips a stage that has it

Steps are counted per stage; the *run step* adds the steps of the stages before it
(``step_offset``; see :mod:`~mlkd_scale.engine.stage_runner`).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel

from mlkd_scale.engine.checkpoints.files import atomic_write_text, read_json_record, tag_for
from mlkd_scale.engine.checkpoints.manager import CheckpointManager
from mlkd_scale.engine.checkpoints.safe_load import load_plain
from mlkd_scale.engine.deepspeed_engine import LossFn, build_engine
from mlkd_scale.engine.distributed import DistInfo
from mlkd_scale.engine.export.hf_export import consolidated_state_dict
from mlkd_scale.engine.stage_runner import SameWorldResume, StageParts, StageRunner
from mlkd_scale.eval.dev import PredictFn, evaluate, flat_metrics, format_metrics
from mlkd_scale.eval.protocol import Evaluation
from mlkd_scale.spec import RunSpec, StageBudget
from mlkd_scale.spec.plan import Plan
from mlkd_scale.tasks.base import EncodedSplit, Task
from mlkd_scale.tasks.sampler import EpochSampler, steps_for

RESULT = "result.json"


@dataclass
class StageSetup:
    """What one stage trains and how; the caller builds it, :class:`TaskStage` runs it.

    ``module`` holds the trained model as ``module.student`` (the name export looks for), plus
    whatever else is trained with it (the objective's projections). ``make_loss(engine)`` returns
    the loss of one micro batch (the batch carries ``labels``); ``make_predict(engine)`` the dev
    logits of a batch of model inputs.
    """

    name: str  # "finetune", "stage1", "stage2": names the directory and the TensorBoard tags
    module: nn.Module
    make_loss: Callable[[object], LossFn]
    make_predict: Callable[[object], PredictFn]
    train: EncodedSplit
    budget: StageBudget
    stream: int  # separates this stage's data order from the other stages'
    step_offset: int = 0


@dataclass
class TaskContext:
    """What every stage of a run shares."""

    spec: RunSpec
    dist: DistInfo
    plan: Plan  # the run's batch arithmetic and DeepSpeed config; steps are per stage
    task: Task
    tokenizer: object
    dev: dict[str, EncodedSplit]
    stop_after_steps: int | None = None

    @property
    def output_dir(self) -> Path:
        return Path(self.spec.run.output_dir)

    def stage_dir(self, name: str) -> Path:
        return self.output_dir / name

    def checkpoint_dir(self, name: str) -> Path:
        custom = self.spec.checkpoint.dir
        return Path(custom) / name if custom else self.stage_dir(name) / "checkpoints"

    def stage_steps(self, budget: StageBudget, train_size: int) -> int:
        return steps_for(budget.epochs, budget.max_steps, train_size, self.plan.global_batch_size)

    def stage_plan(self, budget: StageBudget, train_size: int) -> Plan:
        total = self.stage_steps(budget, train_size)
        return dataclasses.replace(self.plan, total_steps=total, warmup_steps=math.ceil(budget.warmup_ratio * total))

    def read_result(self, name: str) -> dict | None:
        return read_json_record(self.stage_dir(name) / RESULT)

    def print(self, *lines: str) -> None:
        if self.dist.is_main:
            print(*lines, sep="\n", flush=True)


def is_better(value: float, best: dict | None) -> bool:
    """Every GLUE selection metric is higher-is-better; NaN (a diverged regressor) never wins."""
    return not math.isnan(value) and (best is None or value > best["value"])


def full_state_dict(tag_dir: Path) -> dict[str, torch.Tensor]:
    """The consolidated fp32 weights of a checkpoint, frozen parameters included.

    ZeRO-1 checkpoints do not record frozen parameters for ``zero_to_fp32`` (only ZeRO 2/3 keep
    their fragments), so any key the consolidation lacks is taken from the saved module states
    (frozen parameters never change, so that copy is exact up to the training dtype).
    """
    state = consolidated_state_dict(tag_dir)
    model_file = tag_dir / "mp_rank_00_model_states.pt"
    if model_file.is_file():
        module = load_plain(model_file, mmap=True).get("module") or {}
        for key, value in module.items():
            if key not in state and isinstance(value, torch.Tensor) and value.numel():
                state[key] = value.float() if value.is_floating_point() else value
    return state


class SampledBatches:
    """A task stage's batch source: shuffled micro batches of an encoded split, epoch by epoch.
    ``index`` [B] holds the samples' rows in the split (the teacher cache's key)."""

    def __init__(self, split: EncodedSplit, sampler: EpochSampler, device: torch.device):
        self.split, self.sampler, self.device = split, sampler, device

    def next_batch(self, step: int) -> dict:
        indices = self.sampler.next_indices()
        return {**self.split.batch(indices, self.device), "index": torch.as_tensor(indices)}

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)

    def log_scalars(self) -> dict[str, float]:
        return {}


class DevEvaluator:
    """Dev metrics of a task stage every ``task.eval_every_n_steps`` steps and at its last step;
    every evaluation is checkpointed, the best by the task's main metric is pinned."""

    checkpoint_each = True

    def __init__(self, ctx: TaskContext, predict: PredictFn, name: str, total: int):
        self.ctx, self.predict, self.name, self.total = ctx, predict, name, total
        self.every = ctx.spec.task.eval_every_n_steps

    def due(self, step: int, stop_at: int, total: int) -> bool:
        return step == total or bool(self.every and step % self.every == 0)

    def evaluate(self) -> Evaluation:
        ctx = self.ctx
        results = evaluate(self.predict, ctx.dev, ctx.task, ctx.spec.task.eval_batch_size, ctx.dist)
        scalars = {f"eval/{k}": v for k, v in flat_metrics(results).items()}
        value = results[next(iter(results))][ctx.task.main_metric]
        return Evaluation(scalars, value, {"metrics": results}, history=results)

    def is_better(self, value: float, best: dict | None) -> bool:
        return is_better(value, best)

    def report(self, evaluation: Evaluation, best: dict | None, step: int, run_step: int) -> tuple[dict, str]:
        tail = f" (best {best['value']:.4f} at step {best['step']})" if best else ""
        line = (f"{self.name} step {step}/{self.total} (run step {run_step}) dev: "
                f"{format_metrics(evaluation.record['metrics'])}{tail}")
        return evaluation.scalars, line


class TaskStage:
    """Builds one :class:`StageSetup`'s parts and runs them to the budget (or to
    ``ctx.stop_after_steps``) with a :class:`StageRunner`; writes ``result.json`` at the end."""

    def __init__(self, ctx: TaskContext, setup: StageSetup, hf_model: PreTrainedModel):
        self.ctx, self.setup = ctx, setup
        spec, info = ctx.spec, ctx.dist
        self.name = setup.name
        self.plan = ctx.stage_plan(setup.budget, len(setup.train))
        self.engine, scheduler = build_engine(setup.module, spec.train, self.plan, setup.budget.lr)
        sampler = EpochSampler(
            len(setup.train), self.plan.micro_batch_size, info.rank, info.world_size, spec.run.seed, setup.stream
        )
        checkpoints = CheckpointManager(
            ctx.checkpoint_dir(self.name), spec.checkpoint.keep_last, info.rank, info.world_size,
            owner=f"{spec.run.name}/{self.name}", every_n_steps=spec.checkpoint.every_n_steps,
        )
        checkpoints.save_hf_meta(hf_model, ctx.tokenizer)
        resume = spec.checkpoint.resume
        if resume not in ("auto", "never") and Path(resume).parent.resolve() != checkpoints.ckpt_dir.resolve():
            resume = "auto"  # checkpoint.resume names a checkpoint of another stage
        tag_dir = checkpoints.resolve_resume(resume)
        parts = StageParts(
            name=self.name, engine=self.engine, scheduler=scheduler, loss_fn=setup.make_loss(self.engine),
            batches=SampledBatches(setup.train, sampler, info.device), checkpoints=checkpoints,
            resume=SameWorldResume(checkpoints, tag_dir),
            plan=self.plan, counted={"samples_seen": self.plan.global_batch_size},
            evaluator=DevEvaluator(ctx, setup.make_predict(self.engine), self.name, self.plan.total_steps),
            step_offset=setup.step_offset, tag_prefix=f"{self.name}/", epoch_examples=len(setup.train),
        )
        self.runner = StageRunner(spec, info, parts, ctx.output_dir)

    def run(self) -> dict:
        """Train to the budget or the stop step; returns ``{"step", "finished", "result"}``."""
        ctx, runner, budget = self.ctx, self.runner, self.setup.budget
        offset = self.setup.step_offset
        why = "max_steps" if budget.max_steps else f"{budget.epochs:g} epochs"
        ctx.print(
            f"{self.name}: {runner.total} steps ({why}; {len(self.setup.train):,} examples, "
            f"{self.plan.global_batch_size} per step), lr {budget.lr:g}, warm-up {self.plan.warmup_steps} steps; "
            f"run steps {offset + 1}..{offset + runner.total}"
        )
        finished = runner.run(ctx.stop_after_steps, label=self.name)
        result = self._finish() if finished else None
        return {"step": runner.step, "finished": finished, "result": result}

    def _finish(self) -> dict:
        """Pin a best (the final checkpoint if no evaluation gave a number) and write result.json."""
        runner = self.runner
        if runner.best is None:
            final = runner.eval_history[-1][1] if runner.eval_history else {}
            runner.best = {"step": runner.step, "value": float("nan"), "metrics": final}
            runner.checkpoints.mark_best(runner.step, {"value": None})
        final_metrics = next((m for s, m in reversed(runner.eval_history) if s == runner.step), None)
        ckpt = runner.checkpoints.ckpt_dir
        first, last = runner.first_and_last_loss()
        result = {
            "stage": self.name,
            "steps": runner.total,
            "step_offset": self.setup.step_offset,
            "main_metric": self.ctx.task.main_metric,
            "best": {**runner.best, "checkpoint": str((ckpt / tag_for(runner.best["step"])).absolute())},
            "final": {"step": runner.step, "metrics": final_metrics,
                      "checkpoint": str((ckpt / tag_for(runner.step)).absolute())},
            "first_loss": first,
            "last_loss": last,
            "epoch_seconds": runner.clock.report(),  # training steps only, epochs of this launch
        }
        if self.ctx.dist.is_main:
            atomic_write_text(self.ctx.stage_dir(self.name) / RESULT, json.dumps(result, indent=1) + "\n")
        torch.distributed.barrier()
        best = runner.best
        self.ctx.print(
            f"{self.name} finished at step {runner.step}: best dev {self.ctx.task.main_metric} {best['value']:.4f} "
            f"at step {best['step']}"
        )
        return result

    def close(self) -> None:
        """Free the engine and its optimizer state (a later stage builds its own)."""
        self.runner.close_logs()
        self.engine.destroy()
        del self.engine, self.runner
        gc.collect()
