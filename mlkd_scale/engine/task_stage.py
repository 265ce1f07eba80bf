"""One stage of a task run (teacher fine-tuning, Stage 1 or Stage 2) on DeepSpeed.

A stage is a budget of optimizer steps over an encoded train split, with dev evaluation, its own
checkpoint directory and TensorBoard tags, and exact resume. Reading order: :class:`StageSetup`
is what the caller decides (what is trained and its loss); :class:`TaskStage` builds the engine,
resumes, and :meth:`TaskStage.run` is the loop. Layout under ``<run.output_dir>/<stage>/``::

    checkpoints/     CheckpointManager's directory (or <checkpoint.dir>/<stage>); best.json pins
                     the checkpoint best on dev against keep_last pruning
    result.json      written once the stage finished: steps, best and final checkpoint, metrics;
                     a relaunch skips a stage that has it

Steps are counted per stage; the *run step* adds the steps of the stages before it
(``step_offset``). TensorBoard's x axis and ``--stop_after_steps`` use run steps, so Stage 2's
curves continue Stage 1's and one number stops a run anywhere.
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
from deepspeed.accelerator import get_accelerator
from torch import nn
from tqdm import tqdm
from transformers import PreTrainedModel

from mlkd_scale.data.glue import GlueTask
from mlkd_scale.data.task_data import EncodedSplit, EpochSampler, steps_for
from mlkd_scale.engine.checkpoint import (
    CheckpointError,
    CheckpointManager,
    atomic_write_text,
    tag_for,
)
from mlkd_scale.engine.checkpoint_files import read_json_record
from mlkd_scale.engine.distributed import DistInfo
from mlkd_scale.engine.epoch_clock import EpochClock
from mlkd_scale.engine.evaluate import PredictFn, evaluate, flat_metrics, format_metrics
from mlkd_scale.engine.export import consolidated_state_dict
from mlkd_scale.engine.faults import RunGuard, is_comm_failure
from mlkd_scale.engine.loop import (
    LossFn,
    Window,
    build_engine,
    optimizer_scalars,
    optimizer_step,
)
from mlkd_scale.engine.rng_state import capture_rng_state, restore_rng_state
from mlkd_scale.engine.safe_load import load_plain
from mlkd_scale.engine.tb_logger import TensorBoardLogger
from mlkd_scale.plan import Plan
from mlkd_scale.spec import RunSpec, StageBudget, spec_hash

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
    task: GlueTask
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


class TaskStage:
    """Runs one :class:`StageSetup` to its budget (or to ``ctx.stop_after_steps``), resumably."""

    def __init__(self, ctx: TaskContext, setup: StageSetup, hf_model: PreTrainedModel):
        self.ctx, self.setup = ctx, setup
        spec, info = ctx.spec, ctx.dist
        self.name = setup.name
        self.plan = ctx.stage_plan(setup.budget, len(setup.train))
        self.total = self.plan.total_steps
        self.engine, self.scheduler = build_engine(setup.module, spec.train, self.plan, setup.budget.lr)
        self.loss_fn = setup.make_loss(self.engine)
        self.predict = setup.make_predict(self.engine)
        self.sampler = EpochSampler(
            len(setup.train), self.plan.micro_batch_size, info.rank, info.world_size, spec.run.seed, setup.stream
        )
        self.checkpoints = CheckpointManager(
            ctx.checkpoint_dir(self.name), spec.checkpoint.keep_last, info.rank, info.world_size,
            owner=f"{spec.run.name}/{self.name}",
        )
        self.checkpoints.save_hf_meta(hf_model, ctx.tokenizer)
        self.guard = RunGuard(spec.faults, info, self.checkpoints.latest_name)  # preemption, non-finite steps
        self.step = 0
        self.samples_seen = 0
        self.loss_history: list[tuple[int, float]] = []
        self.eval_history: list[tuple[int, dict]] = []
        self.best: dict | None = None  # {"step", "value", "metrics"}
        self._resume()
        self.clock = EpochClock(len(setup.train), self.plan.global_batch_size, get_accelerator().synchronize)
        self.logger = TensorBoardLogger(
            spec.logging.tensorboard_dir or ctx.output_dir / "tensorboard",
            enabled=info.is_main,
            purge_step=setup.step_offset + self.step + 1,
        )
        self.logger.text(f"{self.name}/spec", "```json\n" + spec.model_dump_json(indent=2) + "\n```")
        self.logger.text(f"{self.name}/plan", "```\n" + self.plan.summary() + "\n```")

    # ---- checkpoint state -----------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "stage": self.name,
            "step": self.step,
            "samples_seen": self.samples_seen,
            "loss_history": self.loss_history,
            "eval_history": self.eval_history,
            "best": self.best,
            "spec": self.ctx.spec.model_dump(mode="json"),
            "spec_hash": spec_hash(self.ctx.spec),
        }

    def _resume(self) -> None:
        resume = self.ctx.spec.checkpoint.resume
        if resume not in ("auto", "never") and Path(resume).parent.resolve() != self.checkpoints.ckpt_dir.resolve():
            resume = "auto"  # checkpoint.resume names a checkpoint of another stage
        tag_dir = self.checkpoints.resolve_resume(resume)
        if tag_dir is None:
            return
        client, rank_state = self.checkpoints.load(self.engine, tag_dir)
        if client.get("stage") != self.name:
            raise CheckpointError(f"{tag_dir} is a checkpoint of {client.get('stage')!r}, not of {self.name}")
        self.step = client["step"]
        self.samples_seen = client["samples_seen"]
        self.loss_history = [tuple(x) for x in client["loss_history"]]
        self.eval_history = [tuple(x) for x in client["eval_history"]]
        self.best = client["best"]
        try:
            self.sampler.load_state_dict(rank_state["data"])
        except ValueError as error:
            raise CheckpointError(f"{tag_dir}: {error}") from None
        restore_rng_state(rank_state["rng"])
        if self.best is not None:  # re-pin: a crash may have come between the save and the pin
            self.checkpoints.mark_best(self.best["step"], {"value": self.best["value"]})
        if client.get("spec_hash") != spec_hash(self.ctx.spec):
            self.ctx.print(f"warning: resuming {tag_dir} with a changed spec")
        self.ctx.print(f"resumed from {tag_dir} at {self.name} step {self.step}")

    def _save(self) -> Path:
        rank_state = {"data": self.sampler.state_dict(), "rng": capture_rng_state()}
        return self.checkpoints.save(self.engine, self.step, self.state_dict(), rank_state)

    # ---- the loop -------------------------------------------------------------------------------

    def _next_batch(self) -> dict:
        """The next micro batch; ``index`` [B] holds its samples' rows in the split (the teacher cache's key)."""
        indices = self.sampler.next_indices()
        return {**self.setup.train.batch(indices, self.ctx.dist.device), "index": torch.as_tensor(indices)}

    def run(self) -> dict:
        """Train to the budget or the stop step; returns ``{"step", "finished", "result"}``."""
        ctx, spec = self.ctx, self.ctx.spec
        offset = self.setup.step_offset
        stop_at = self.total
        if ctx.stop_after_steps is not None:
            stop_at = max(self.step, min(self.total, ctx.stop_after_steps - offset))
        budget = self.setup.budget
        why = "max_steps" if budget.max_steps else f"{budget.epochs:g} epochs"
        ctx.print(
            f"{self.name}: {self.total} steps ({why}; {len(self.setup.train):,} examples, "
            f"{self.plan.global_batch_size} per step), lr {budget.lr:g}, warm-up {self.plan.warmup_steps} steps; "
            f"run steps {offset + 1}..{offset + self.total}"
        )
        eval_every = spec.task.eval_every_n_steps
        self.engine.train()
        progress = tqdm(
            total=self.total,
            initial=self.step,
            disable=not (ctx.dist.is_main and spec.logging.progress_bar),
            desc=self.name,
            unit="step",
        )
        guard = self.guard
        window = Window()
        checkpoint_due = False
        try:
            while self.step < stop_at:
                self.clock.start()
                terms = optimizer_step(self.engine, self._next_batch, self.loss_fn, self.plan.gradient_accumulation_steps)
                self.step += 1
                epoch_s = self.clock.stop(self.step, last=self.step == stop_at)
                if epoch_s is not None:
                    self.logger.scalars(offset + self.step, {f"{self.name}/time/epoch_s": epoch_s})
                self.samples_seen += self.plan.global_batch_size
                window.add(terms)
                progress.update(1)
                if self.step % spec.logging.every_n_steps == 0 or self.step == stop_at:
                    self._log(window, progress)
                    window = Window()
                stop = guard.check_step(self.engine, offset + self.step)
                evaluate_now = self.step == self.total or bool(eval_every and self.step % eval_every == 0)
                improved = self._evaluate() if evaluate_now else False
                checkpoint_due = checkpoint_due or self.step % spec.checkpoint.every_n_steps == 0
                if stop or evaluate_now or self.step == stop_at or (checkpoint_due and guard.checkpoint_ok):
                    tag_dir = self._save()
                    checkpoint_due = False
                if improved:
                    self.checkpoints.mark_best(self.step, {"value": self.best["value"]})
                if stop:
                    raise guard.preempted(offset + self.step, tag_dir.name)
        except RuntimeError as error:
            if is_comm_failure(error):
                raise guard.peer_failure(error, offset + self.step) from error
            raise
        finally:
            progress.close()
            self.logger.close()
            guard.close()
        finished = self.step >= self.total
        result = self._finish() if finished else None
        return {"step": self.step, "finished": finished, "result": result}

    def _evaluate(self) -> bool:
        """Dev metrics now; True when they are the best so far (the caller pins the checkpoint)."""
        self.engine.eval()
        results = evaluate(self.predict, self.ctx.dev, self.ctx.task, self.ctx.spec.task.eval_batch_size, self.ctx.dist)
        self.engine.train()
        value = results[next(iter(results))][self.ctx.task.main_metric]
        self.eval_history.append((self.step, results))
        improved = is_better(value, self.best)
        if improved:
            self.best = {"step": self.step, "value": value, "metrics": results}
        run_step = self.setup.step_offset + self.step
        self.logger.scalars(run_step, {f"eval/{k}": v for k, v in flat_metrics(results).items()})
        self.logger.flush()
        best = f" (best {self.best['value']:.4f} at step {self.best['step']})" if self.best else ""
        self.ctx.print(
            f"{self.name} step {self.step}/{self.total} (run step {run_step}) dev: {format_metrics(results)}{best}"
        )
        return improved

    def _log(self, window: Window, progress: tqdm) -> None:
        means = window.global_means()
        seconds = window.elapsed()
        scalars = {f"loss/{name}": value for name, value in means.items()}
        scalars.update(optimizer_scalars(self.engine, self.scheduler, self.ctx.dist.device))
        samples = window.steps * self.plan.global_batch_size
        scalars.update(
            {
                "throughput/samples_per_s": samples / seconds,
                "throughput/tokens_per_s": window.steps * self.plan.tokens_per_step / seconds,
                "train/samples_seen": self.samples_seen,
            }
        )
        self.logger.scalars(self.setup.step_offset + self.step, {f"{self.name}/{k}": v for k, v in scalars.items()})
        self.loss_history.append((self.step, scalars["loss/total"]))
        progress.set_postfix(loss=f"{scalars['loss/total']:.4f}", refresh=False)

    def _finish(self) -> dict:
        """Pin a best (the final checkpoint if no evaluation gave a number) and write result.json."""
        if self.best is None:
            final = self.eval_history[-1][1] if self.eval_history else {}
            self.best = {"step": self.step, "value": float("nan"), "metrics": final}
            self.checkpoints.mark_best(self.step, {"value": None})
        final_metrics = next((m for s, m in reversed(self.eval_history) if s == self.step), None)
        ckpt = self.checkpoints.ckpt_dir
        result = {
            "stage": self.name,
            "steps": self.total,
            "step_offset": self.setup.step_offset,
            "main_metric": self.ctx.task.main_metric,
            "best": {**self.best, "checkpoint": str((ckpt / tag_for(self.best["step"])).absolute())},
            "final": {"step": self.step, "metrics": final_metrics, "checkpoint": str((ckpt / tag_for(self.step)).absolute())},
            "first_loss": self.loss_history[0][1] if self.loss_history else None,
            "last_loss": self.loss_history[-1][1] if self.loss_history else None,
            "epoch_seconds": self.clock.report(),  # training steps only, epochs of this launch
        }
        if self.ctx.dist.is_main:
            atomic_write_text(self.ctx.stage_dir(self.name) / RESULT, json.dumps(result, indent=1) + "\n")
        torch.distributed.barrier()
        best = self.best
        self.ctx.print(
            f"{self.name} finished at step {self.step}: best dev {self.ctx.task.main_metric} {best['value']:.4f} "
            f"at step {best['step']}"
        )
        return result

    def close(self) -> None:
        """Free the engine and its optimizer state (a later stage builds its own)."""
        self.logger.close()
        self.engine.destroy()
        del self.engine, self.scheduler, self.loss_fn, self.predict
        gc.collect()
