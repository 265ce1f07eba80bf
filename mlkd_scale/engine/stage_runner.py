"""One stage runner for every stage: general distillation, teacher fine-tuning and each task stage.

A stage is built from a batch source, an objective on a DeepSpeed engine, an optional evaluator
and a budget (the shape of torchtitan's ``Trainer``):

* :class:`BatchSource`: the next micro batch, and its position as state (a corpus stream, an
  epoch sampler);
* ``loss_fn(batch) -> (total, {term: value})``: the objective of one micro batch;
* :class:`Evaluator` (optional): when an evaluation is due, its scalars, and the value that picks
  the best checkpoint;
* the budget: ``plan.total_steps`` of this stage, and the run step to stop at.

:class:`StageRunner` is one stateful object: :meth:`~StageRunner.state_dict` (step, what was
seen, loss and evaluation history, best) goes into every checkpoint together with the batch
source's position and the random generators (:meth:`~StageRunner.rank_state`), and comes back
on resume. :meth:`~StageRunner.run` is the loop; what happens between two steps is decided in
one place, :meth:`~StageRunner._after_step`: log, agree on a stop (:class:`RunGuard`), evaluate,
checkpoint when :meth:`CheckpointManager.save_due` says so, pin the best, stop.

Steps are counted per stage; the *run step* adds ``step_offset`` (the steps of the stages before
it). TensorBoard's x axis and ``--stop_after_steps`` use run steps, so Stage 2's curves continue
Stage 1's and one number stops a run anywhere.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from deepspeed.accelerator import get_accelerator
from tqdm import tqdm

from mlkd_scale.engine.checkpoints.manager import CheckpointManager
from mlkd_scale.engine.checkpoints.rng_state import capture_rng_state, restore_rng_state
from mlkd_scale.engine.deepspeed_engine import LossFn, Window, optimizer_scalars, optimizer_step
from mlkd_scale.engine.distributed import DistInfo
from mlkd_scale.engine.epoch_clock import EpochClock
from mlkd_scale.engine.faults import RunGuard, is_comm_failure
from mlkd_scale.engine.trackers import open_trackers
from mlkd_scale.errors import CheckpointError
from mlkd_scale.eval.protocol import Evaluator
from mlkd_scale.spec import RunSpec, spec_hash
from mlkd_scale.spec.plan import Plan

log = logging.getLogger("mlkd_scale")


class BatchSource(Protocol):
    """Where a stage's micro batches come from; its position is checkpointed per rank."""

    def next_batch(self, step: int) -> dict:
        """The next micro batch of stage step ``step`` (1-based), on the device."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def log_scalars(self) -> dict[str, float]:
        """Extra scalars at each logging step (collective: every rank calls it)."""


class ResumeSource(Protocol):
    """The checkpoint a stage continues from (``tag_dir`` None: a fresh start) and how to load it."""

    tag_dir: Path | None

    def load(self, engine) -> tuple[dict, dict]:
        """Restore ``engine``; return ``(client_state, rank_state)`` for this rank (collective)."""


@dataclass
class SameWorldResume:
    """Resume from ``tag_dir`` at the world size it was saved with (task stages); general
    distillation's :class:`~mlkd_scale.engine.checkpoints.reshard.Resume` also reshapes."""

    checkpoints: CheckpointManager
    tag_dir: Path | None

    def load(self, engine) -> tuple[dict, dict]:
        return self.checkpoints.load(engine, self.tag_dir)


@dataclass
class StageParts:
    """What a caller builds for one stage; :class:`StageRunner` runs it.

    ``name`` is the stage ("general", "finetune", "stage1", "stage2"): stored in its checkpoints
    (a checkpoint of another stage is refused) and, through ``tag_prefix``, in its TensorBoard tags.
    ``counted`` says what one optimizer step adds to the run's counters (``tokens_seen``,
    ``samples_seen``), logged as ``train/<counter>``.
    """

    name: str
    engine: object
    scheduler: object
    loss_fn: LossFn
    batches: BatchSource
    checkpoints: CheckpointManager
    resume: ResumeSource
    plan: Plan
    counted: dict[str, int]
    evaluator: Evaluator | None = None
    step_offset: int = 0
    tag_prefix: str = ""
    epoch_examples: int | None = None  # examples per epoch: time each epoch (task stages)


class StageRunner:
    """Runs one :class:`StageParts` to its budget (or to the stop step), resumably."""

    def __init__(self, spec: RunSpec, dist: DistInfo, parts: StageParts, output_dir: Path):
        self.spec, self.dist, self.parts = spec, dist, parts
        self.engine, self.plan, self.batches = parts.engine, parts.plan, parts.batches
        self.checkpoints, self.evaluator = parts.checkpoints, parts.evaluator
        self.total = parts.plan.total_steps
        self.guard = RunGuard(spec.faults, dist, self.checkpoints.latest_name)  # preemption, non-finite steps
        self.step = 0
        self.seen = dict.fromkeys(parts.counted, 0)
        self.loss_history: list[tuple[int, float]] = []  # (step, total) at each logging step
        self.eval_history: list[tuple[int, object]] = []
        self.best: dict | None = None  # {"step", "value", **Evaluation.record}
        self._resume()
        self.clock = None
        if parts.epoch_examples:
            self.clock = EpochClock(parts.epoch_examples, self.plan.global_batch_size, get_accelerator().synchronize)
        self.logger = open_trackers(
            spec, output_dir, enabled=dist.is_main, resume_step=parts.step_offset + self.step,
            checkpoints=self.checkpoints, step_offset=parts.step_offset,
        )
        self.logger.text(f"{parts.tag_prefix}spec", "```json\n" + spec.model_dump_json(indent=2) + "\n```")
        self.logger.text(f"{parts.tag_prefix}plan", "```\n" + self.plan.summary() + "\n```")

    @property
    def run_step(self) -> int:
        return self.parts.step_offset + self.step

    # ---- checkpoint state -----------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Client state stored with DeepSpeed's shards (the same on every rank)."""
        return {
            "stage": self.parts.name,
            "step": self.step,
            **self.seen,
            "loss_history": self.loss_history,
            "eval_history": self.eval_history,
            "best": self.best,
            "spec": self.spec.model_dump(mode="json"),
            "spec_hash": spec_hash(self.spec),
        }

    def rank_state(self) -> dict:
        """Per-rank state: this rank's data position and random generators."""
        return {"data": self.batches.state_dict(), "rng": capture_rng_state()}

    def _resume(self) -> None:
        tag_dir = self.parts.resume.tag_dir
        if tag_dir is None:
            return
        client, rank_state = self.parts.resume.load(self.engine)
        stage = client.get("stage", "general")  # general-distillation checkpoints before stages had names
        if stage != self.parts.name:
            raise CheckpointError(f"{tag_dir} is a checkpoint of {stage!r}, not of {self.parts.name}")
        self.step = client["step"]
        self.seen = {k: client.get(k, 0) for k in self.seen}
        self.loss_history = [tuple(x) for x in client.get("loss_history", [])]
        self.eval_history = [tuple(x) for x in client.get("eval_history", [])]
        self.best = client.get("best")
        try:
            self.batches.load_state_dict(rank_state["data"])
        except ValueError as error:  # a data position that does not fit this run (e.g. another world size)
            raise CheckpointError(f"{tag_dir}: {error}") from None
        restore_rng_state(rank_state["rng"])
        if self.best is not None:  # re-pin: a crash may have come between the save and the pin
            self.checkpoints.mark_best(self.best["step"], {"value": self.best["value"]})
        if client.get("spec_hash") != spec_hash(self.spec) and self.dist.is_main:
            now = self.spec.model_dump(mode="json")
            changed = sorted(k for k, v in client.get("spec", {}).items() if v != now.get(k))
            log.warning("resuming %s with a changed spec (sections: %s)", tag_dir, ", ".join(changed) or "?")
        label = "" if self.parts.name == "general" else f"{self.parts.name} "
        self.print(f"resumed from {tag_dir} at {label}step {self.step}")

    def save_checkpoint(self) -> Path:
        return self.checkpoints.save(self.engine, self.step, self.state_dict(), self.rank_state())

    # ---- the loop -------------------------------------------------------------------------------

    def train_step(self, stop_at: int | None = None) -> dict[str, torch.Tensor]:
        """One optimizer step (all micro batches); returns the step's mean loss terms, on device."""
        if self.clock is not None:
            self.clock.start()
        step = self.step + 1
        terms = optimizer_step(
            self.engine, lambda: self.batches.next_batch(step), self.parts.loss_fn,
            self.plan.gradient_accumulation_steps,
        )
        self.step = step
        for counter, per_step in self.parts.counted.items():
            self.seen[counter] += per_step
        if self.clock is not None:
            epoch_s = self.clock.stop(self.step, last=self.step == stop_at)
            if epoch_s is not None:
                self.logger.scalars(self.run_step, {f"{self.parts.tag_prefix}time/epoch_s": epoch_s})
        return terms

    def stop_step(self, stop_after_steps: int | None) -> int:
        """The stage step to stop at: the budget, or the run step ``stop_after_steps`` (never before now)."""
        if stop_after_steps is None:
            return self.total
        return max(self.step, min(self.total, stop_after_steps - self.parts.step_offset))

    def run(self, stop_after_steps: int | None = None, label: str = "distilling") -> bool:
        """Train to the budget or the stop step; True when the budget is done.

        Raises :class:`~mlkd_scale.engine.faults.RunStopped` on preemption (after its checkpoint),
        after too many non-finite steps in a row, and when a collective with the other ranks fails.
        """
        stop_at = self.stop_step(stop_after_steps)
        self.engine.train()
        progress = tqdm(
            total=self.total,
            initial=self.step,
            disable=not (self.dist.is_main and self.spec.logging.progress_bar),
            desc=label,
            unit="step",
        )
        window = Window()
        try:
            while self.step < stop_at:
                window.add(self.train_step(stop_at))
                progress.update(1)
                if self.step % self.spec.logging.every_n_steps == 0 or self.step == stop_at:
                    self._log(window, progress)
                    window = Window()
                self._after_step(stop_at)
        except RuntimeError as error:
            if is_comm_failure(error):
                raise self.guard.peer_failure(error, self.run_step) from error
            raise
        finally:
            progress.close()
            self.close_logs()
        return self.step >= self.total

    def _after_step(self, stop_at: int) -> None:
        """Every decision between two steps: stop agreed?, evaluate?, checkpoint?, best?, stop."""
        stop = self.guard.check_step(self.engine, self.run_step)
        evaluation = None
        if self.evaluator is not None and self.evaluator.due(self.step, stop_at, self.total):
            self.engine.eval()
            evaluation = self.evaluator.evaluate()
            self.engine.train()
        improved = evaluation is not None and self.evaluator.is_better(evaluation.value, self.best)
        forced = stop or self.step == stop_at or (evaluation is not None and self.evaluator.checkpoint_each)
        save = self.checkpoints.save_due(self.step, forced=forced, wanted=improved, healthy=self.guard.checkpoint_ok)
        if evaluation is not None:
            self.eval_history.append((self.step, evaluation.history))
            if improved and save:  # the best is a checkpoint: it records itself as the best
                self.best = {"step": self.step, "value": evaluation.value, **evaluation.record}
        tag_dir = self.save_checkpoint() if save else None
        if improved and save:
            self.checkpoints.mark_best(self.step, {"value": self.best["value"]})
        if evaluation is not None:
            scalars, line = self.evaluator.report(evaluation, self.best, self.step, self.run_step)
            self.logger.scalars(self.run_step, scalars)
            self.logger.flush()
            self.print(line)
        if stop:
            raise self.guard.preempted(self.run_step, tag_dir.name)

    def _log(self, window: Window, progress: tqdm) -> None:
        means = window.global_means()  # one all-reduce per logging step, not per step
        seconds = window.elapsed()
        scalars = {f"loss/{name}": value for name, value in means.items()}
        scalars.update(optimizer_scalars(self.engine, self.parts.scheduler, self.dist.device))
        scalars.update(
            {
                "throughput/tokens_per_s": window.steps * self.plan.tokens_per_step / seconds,
                "throughput/samples_per_s": window.steps * self.plan.global_batch_size / seconds,
            }
        )
        scalars.update({f"train/{counter}": value for counter, value in self.seen.items()})
        scalars.update(self.batches.log_scalars())
        prefix = self.parts.tag_prefix
        self.logger.scalars(self.run_step, {f"{prefix}{k}": v for k, v in scalars.items()})
        total = scalars["loss/total"]
        self.loss_history.append((self.step, total))
        progress.set_postfix(loss=f"{total:.4f}", refresh=False)

    # ---- the end --------------------------------------------------------------------------------

    def first_and_last_loss(self) -> tuple[float | None, float | None]:
        if not self.loss_history:
            return None, None
        return self.loss_history[0][1], self.loss_history[-1][1]

    def print(self, *lines: str) -> None:
        if self.dist.is_main:
            print(*lines, sep="\n", flush=True)

    def close_logs(self) -> None:
        """Close the trackers and give the signals back (the end of :meth:`run`, or of a caller's own steps)."""
        self.logger.close()
        self.guard.close()
