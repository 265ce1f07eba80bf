"""General distillation on DeepSpeed: spec → engine → loop → checkpoints, TensorBoard, export.

One object per run. Reading order: :meth:`Trainer.__init__` builds everything (teacher, student,
objective, DeepSpeed engine, data stream, checkpoints, logger) and resumes if a checkpoint exists;
:meth:`Trainer.train` is the loop; :meth:`Trainer.state_dict` is what a checkpoint carries
besides DeepSpeed's own shards.

When the objective reads masked-language-model predictions (the distilbert preset), teacher and
student are ``AutoModelForMaskedLM`` models and every micro batch is corrupted on the CPU
(:mod:`mlkd_scale.data.mlm_masking`) before both see it; the labels go to the objective.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import deepspeed
import torch
from tqdm import tqdm
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoTokenizer, PreTrainedModel
from transformers import logging as hf_logging

from mlkd_scale.data.mlm_masking import BatchMasker
from mlkd_scale.engine.checkpoint import CheckpointManager, tag_for
from mlkd_scale.engine.checkpoint_files import claim_folder
from mlkd_scale.engine.distributed import DistInfo, init_distributed
from mlkd_scale.engine.export import export_checkpoint
from mlkd_scale.engine.faults import RunGuard, is_comm_failure
from mlkd_scale.engine.heldout_eval import HeldoutEval
from mlkd_scale.engine.loop import Window, build_engine, optimizer_scalars, optimizer_step
from mlkd_scale.engine.module import MODEL_INPUTS, DistillationModule, compile_for_speed
from mlkd_scale.engine.reshard import prepare_resume
from mlkd_scale.engine.rng_state import capture_rng_state, restore_rng_state
from mlkd_scale.engine.tb_logger import TensorBoardLogger
from mlkd_scale.engine.teacher_placement import place_teacher
from mlkd_scale.losses import DistillationObjective
from mlkd_scale.losses.presets import get_preset
from mlkd_scale.models import (
    FeatureTap,
    build_student,
    check_model_fit,
    load_teacher,
    resolve_init_layers,
    resolve_layer_mapping,
)
from mlkd_scale.plan import resolve_plan
from mlkd_scale.spec import RunSpec, SpecError, spec_hash, teacher_fit_problems

log = logging.getLogger("mlkd_scale")


def build_models(
    spec: RunSpec, is_main: bool, tokenizer=None
) -> tuple[PreTrainedModel, PreTrainedModel, DistillationObjective]:
    """``(teacher, student, objective)``, the models of the class the objective reads from.

    An objective whose terms read masked-language-model predictions (``objective.masked_lm``, the
    distilbert preset's stage 1) gets an ``AutoModelForMaskedLM`` teacher and a student of the same
    class, whose tapped ``logits`` are the MLM logits [B, L, V]; any other a bare ``AutoModel``.
    Rank 0 warns when the teacher's checkpoint lacks weights of that class (an untrained MLM head).
    A student that cannot be initialised from this teacher, and a ``tokenizer`` (the run's) or a
    sequence length that does not fit the teacher's embeddings, are a :class:`SpecError`, raised
    from the configs before any weight is loaded.
    """
    t_config = AutoConfig.from_pretrained(spec.teacher.path)
    problems = teacher_fit_problems(spec, t_config.to_dict(), f"teacher.path {spec.teacher.path}")
    if problems:
        raise SpecError(problems)
    if tokenizer is not None:
        check_model_fit(spec, tokenizer, t_config)
    model_class = AutoModelForMaskedLM if reads_masked_lm(spec) else AutoModel
    teacher = load_teacher(spec.teacher.path, spec.teacher.dtype, model_class, warn_missing=is_main)
    depth = t_config.num_hidden_layers
    layer_map = resolve_layer_mapping(spec.losses.layer_mapping, spec.student.num_layers, depth)
    init_layers = resolve_init_layers(spec.student, spec.losses.preset, layer_map, depth)
    student = build_student(teacher, spec.student, init_layers)
    return teacher, student, DistillationObjective(spec.losses, teacher.config, student.config, stage=1)


def reads_masked_lm(spec: RunSpec) -> bool:
    """``objective.masked_lm`` of the run's stage-1 objective, known from the spec before any model
    exists: a term of the preset's that reads MLM predictions keeps a weight other than 0."""
    preset = get_preset(spec.losses.preset)
    defaults = preset.default_weights.get(1, {})
    return any(spec.losses.weights.get(term, defaults.get(term, 1.0)) != 0 for term in preset.masked_lm_terms.get(1, ()))


def masker_for(objective: DistillationObjective, tokenizer, vocab_size: int, spec: RunSpec, rank: int):
    """The MLM corruption of the batches (``data.mlm_probability``) when the objective reads MLM
    labels, else None."""
    if not objective.masked_lm:
        return None
    try:
        return BatchMasker(tokenizer, vocab_size, spec.data.mlm_probability, spec.run.seed, rank)
    except ValueError as error:
        raise SpecError(f"teacher.path: {error}; give a teacher whose tokenizer has one") from None


class Trainer:
    """Stage-1 general distillation of ``spec.student`` from ``spec.teacher`` over ``spec.data``."""

    def __init__(self, spec: RunSpec, stop_after_steps: int | None = None, dist: DistInfo | None = None):
        self.spec = spec
        self.stop_after_steps = stop_after_steps
        if spec.data is None:
            raise SpecError(
                "data: general distillation needs a data section; this spec has a task section, "
                "run it with launchers/task_kd.py (or launchers/finetune_teacher.py)"
            )
        self.dist = dist or init_distributed(spec.faults.collective_timeout_s)
        self.plan = resolve_plan(spec, self.dist.world_size)
        self.output_dir = Path(spec.run.output_dir)
        claim_folder(self.output_dir, spec.run.name, "run.output_dir")
        hf_logging.set_verbosity_error()
        deepspeed.runtime.utils.set_random_seed(spec.run.seed)  # same initial student on every rank

        self.tokenizer = AutoTokenizer.from_pretrained(spec.teacher.path)
        teacher, student, objective = build_models(spec, self.dist.is_main, self.tokenizer)
        self.masker = masker_for(objective, self.tokenizer, teacher.config.vocab_size, spec, self.dist.rank)
        self._micro_batch = 0  # index of the next micro batch within the step (the masks' seed)
        self.placed_teacher = place_teacher(teacher, spec.teacher, self.plan, self.dist.device)
        self.teacher = self.placed_teacher.model
        self.teacher_tap = FeatureTap(self.teacher, objective.teacher_request())
        module = DistillationModule(student, objective)
        compile_for_speed(spec.train.compile, self.teacher, module, spec.teacher.placement)
        self.checkpoints = CheckpointManager(
            spec.checkpoint.dir or self.output_dir / "checkpoints",
            spec.checkpoint.keep_last,
            self.dist.rank,
            self.dist.world_size,
            owner=spec.run.name,
        )
        # Before the engine: resuming at a new world size builds it for a universal checkpoint.
        self.resume_from = prepare_resume(self.checkpoints, spec, self.plan.zero_stage)
        self.plan = self.resume_from.engine_plan(self.plan)
        self.engine, self.scheduler = build_engine(module, spec.train, self.plan)
        self.stream = self.resume_from.open_stream(spec.data, self.tokenizer)
        self.step = 0
        self.tokens_seen = 0
        self.loss_history: list[tuple[int, float]] = []  # (step, total) at each logging step
        self.best: dict | None = None  # {"step", "value", "metric", "scalars"}: the best held-out evaluation
        self.heldout = HeldoutEval(spec, self.tokenizer, self.dist.device) if spec.eval.every_n_steps else None
        self._resume()
        self.logger = TensorBoardLogger(
            spec.logging.tensorboard_dir or self.output_dir / "tensorboard",
            enabled=self.dist.is_main,
            purge_step=self.step + 1 if self.step else None,
        )
        self.logger.text("spec", "```json\n" + spec.model_dump_json(indent=2) + "\n```")
        self.logger.text("plan", "```\n" + self.plan.summary() + "\n```")
        self.checkpoints.save_hf_meta(student, self.tokenizer)
        self._sample_log = self._open_sample_log() if spec.logging.record_sample_ids else None
        self.guard = RunGuard(spec.faults, self.dist, self.checkpoints.latest_name)

    # ---- checkpoint state -----------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Client state stored with DeepSpeed's shards (the same on every rank)."""
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "loss_history": self.loss_history,
            "spec": self.spec.model_dump(mode="json"),
            "spec_hash": spec_hash(self.spec),
            "best": self.best,
        }

    def rank_state(self) -> dict:
        """Per-rank state: this rank's data position and random generators."""
        return {"data": self.stream.state_dict(), "rng": capture_rng_state()}

    def _resume(self) -> None:
        tag_dir = self.resume_from.tag_dir
        if tag_dir is None:
            return
        client, rank_state = self.resume_from.load(self.engine)
        self.step = client["step"]
        self.tokens_seen = client["tokens_seen"]
        self.loss_history = [tuple(x) for x in client.get("loss_history", [])]
        self.best = client.get("best")
        if self.best is not None:  # re-pin: a crash may have come between the save and the pin
            self.checkpoints.mark_best(self.best["step"], {"value": self.best["value"]})
        self.stream.load_state_dict(rank_state["data"])
        restore_rng_state(rank_state["rng"])
        if client.get("spec_hash") != spec_hash(self.spec) and self.dist.is_main:
            changed = sorted(k for k, v in client.get("spec", {}).items() if v != self.spec.model_dump(mode="json")[k])
            log.warning("resuming %s with a changed spec (sections: %s)", tag_dir, ", ".join(changed) or "?")
        if self.dist.is_main:
            print(f"resumed from {tag_dir} at step {self.step}", flush=True)

    def save_checkpoint(self) -> Path:
        return self.checkpoints.save(self.engine, self.step, self.state_dict(), self.rank_state())

    # ---- the loop -------------------------------------------------------------------------------

    def _next_batch(self) -> dict:
        batch = self.stream.next_batch(self.plan.micro_batch_size)
        if self._sample_log is not None:
            line = {"step": self.step + 1, "shard": batch.get("shard"), "doc_ids": batch["doc_ids"]}
            self._sample_log.write(json.dumps(line) + "\n")
        # Packed sequences are always full, so no attention mask travels: the models then skip
        # building one and the relation losses skip masking ([B, A, L, L] work per layer).
        inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch and k != "attention_mask"}
        if self.masker is not None:  # on the CPU, before the copy: teacher and student see these ids
            inputs["input_ids"], inputs["labels"] = self.masker(batch["input_ids"], self.step + 1, self._micro_batch)
        self._micro_batch += 1
        return {k: v.to(self.dist.device, non_blocking=True) for k, v in inputs.items()}

    def _loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        labels = batch.pop("labels", None)  # the MLM labels [B, L] (-100 where nothing is predicted)
        # no_grad rather than inference_mode: the losses save teacher tensors for the student's
        # backward (e.g. the MSE target), which autograd refuses to do with inference tensors.
        with torch.no_grad():
            teacher_features = self.teacher_tap(**batch)
        return self.engine(batch, teacher_features, labels)

    def train_step(self) -> dict[str, torch.Tensor]:
        """One optimizer step (all micro batches); returns the step's mean loss terms, on device."""
        self._micro_batch = 0
        terms = optimizer_step(self.engine, self._next_batch, self._loss, self.plan.gradient_accumulation_steps)
        self.step += 1
        self.tokens_seen += self.plan.tokens_per_step
        return terms

    def train(self) -> dict:
        """Run until the step budget (or ``stop_after_steps``); checkpoint, export, summarise.

        Raises :class:`~mlkd_scale.engine.faults.RunStopped` on preemption (after its checkpoint),
        after too many non-finite steps in a row, and when a collective with the other ranks fails.
        """
        spec, plan = self.spec, self.plan
        if self.dist.is_main:
            print(plan.summary(), flush=True)
            print(self.placed_teacher.describe(), flush=True)
        stop_at = min(plan.total_steps, self.stop_after_steps or plan.total_steps)
        self.engine.train()
        progress = tqdm(
            total=plan.total_steps,
            initial=self.step,
            disable=not (self.dist.is_main and spec.logging.progress_bar),
            desc="distilling",
            unit="step",
        )
        try:
            preempted = self._loop(stop_at, progress)
            if preempted is not None:
                raise preempted
            finished = self.step >= plan.total_steps
            exported = None
            if finished and spec.checkpoint.export_at_end and self.dist.is_main:
                exported = self._export()
            torch.distributed.barrier()
        except RuntimeError as error:
            if is_comm_failure(error):
                raise self.guard.peer_failure(error, self.step) from error
            raise
        finally:
            progress.close()
            self.logger.close()
            self.guard.close()
            if self._sample_log is not None:
                self._sample_log.close()
        summary = {
            "step": self.step,
            "finished": finished,
            "tokens_seen": self.tokens_seen,
            "first_loss": self.loss_history[0][1] if self.loss_history else None,
            "last_loss": self.loss_history[-1][1] if self.loss_history else None,
            "exported": str(exported) if exported else None,
        }
        if self.dist.is_main:
            self._print_summary(summary)
        return summary

    def _loop(self, stop_at: int, progress: tqdm):
        """The steps; returns the exception to raise when the ranks agreed to stop (checkpoint written)."""
        spec = self.spec
        window = Window()
        checkpoint_due = False
        while self.step < stop_at:
            terms = self.train_step()
            window.add(terms)
            progress.update(1)
            if self.step % spec.logging.every_n_steps == 0 or self.step == stop_at:
                self._log(window, progress)
                window = Window()
            stop = self.guard.check_step(self.engine, self.step)
            checkpoint_due = checkpoint_due or self.step % spec.checkpoint.every_n_steps == 0
            saved = stop or self.step == stop_at or (checkpoint_due and self.guard.checkpoint_ok)
            if saved:
                tag_dir = self.save_checkpoint()
                checkpoint_due = False
                if stop:
                    return self.guard.preempted(self.step, tag_dir.name)
            if self.heldout is not None and (self.step % spec.eval.every_n_steps == 0 or self.step == stop_at):
                self._evaluate(saved)
        return None

    def _evaluate(self, saved: bool) -> None:
        """Held-out loss and agreement now, in the trackers; a new best is checkpointed (if this step
        was not) and pinned against pruning."""
        scalars = self.heldout.run(self.engine, self.teacher, self._loss, self.masker)
        if self.heldout.improves(scalars, self.best):
            if not saved and self.guard.checkpoint_ok:
                self.save_checkpoint()
            if saved or self.guard.checkpoint_ok:
                value = self.heldout.value(scalars)
                self.best = {"step": self.step, "value": value, "metric": self.spec.eval.metric, "scalars": scalars}
                self.checkpoints.mark_best(self.step, {"value": value})
        if self.best is not None:
            scalars[f"eval/best_{self.spec.eval.metric}"] = self.best["value"]
        self.logger.scalars(self.step, scalars)
        if self.dist.is_main:
            print(f"step {self.step}: held-out loss {scalars['eval/loss_total']:.4f}, "
                  f"agreement {scalars['eval/agreement']:.3f}", flush=True)

    def _export(self) -> Path:
        """The student of the best checkpoint (eval.export 'best', when there is one), else of the newest."""
        if self.best is not None and self.spec.eval.export == "best":
            tag_dir = self.checkpoints.ckpt_dir / tag_for(self.best["step"])
            return export_checkpoint(tag_dir, self.output_dir / "student", results={"heldout": self.best["scalars"]})
        return export_checkpoint(self.checkpoints.ckpt_dir, self.output_dir / "student")

    def _log(self, window: Window, progress: tqdm) -> None:
        means = window.global_means()  # one all-reduce per logging step, not per step
        seconds = window.elapsed()
        sequences = window.steps * self.plan.global_batch_size
        scalars = {f"loss/{name}": value for name, value in means.items()}
        scalars.update(optimizer_scalars(self.engine, self.scheduler, self.dist.device))
        scalars.update(
            {
                "throughput/tokens_per_s": window.steps * self.plan.tokens_per_step / seconds,
                "throughput/samples_per_s": sequences / seconds,
                "train/tokens_seen": self.tokens_seen,
            }
        )
        scalars.update(self._data_counters())
        self.logger.scalars(self.step, scalars)
        total = scalars["loss/total"]
        self.loss_history.append((self.step, total))
        progress.set_postfix(loss=f"{total:.4f}", refresh=False)

    def _data_counters(self) -> dict[str, float]:
        """Corpus counters summed over ranks (documents read, skipped as empty, malformed) and the
        mean epoch; one small all-reduce per logging step."""
        stats = self.stream.stats()
        names = [k for k in ("documents_read", "documents_skipped", "documents_malformed") if k in stats]
        values = [float(stats[k]) for k in names] + [float(stats["epoch"])]
        totals = torch.tensor(values, dtype=torch.float64, device=self.dist.device)
        torch.distributed.all_reduce(totals)
        totals = totals.tolist()
        counters = {f"data/{name}": value for name, value in zip(names, totals)}
        counters["data/epoch_mean"] = totals[-1] / self.dist.world_size
        return counters

    def _print_summary(self, summary: dict) -> None:
        first, last = summary["first_loss"], summary["last_loss"]
        state = "finished" if summary["finished"] else "stopped (resumable)"
        print(f"run {state} at step {summary['step']} after {summary['tokens_seen']:,} tokens", flush=True)
        if first is not None:
            print(f"Stage-1 loss: {first:.4f} at the first logged step -> {last:.4f} at the last", flush=True)
        if summary["exported"]:
            print(f"student exported to {summary['exported']}", flush=True)

    def _open_sample_log(self):
        """Audit trail of the documents each rank trained on: one JSON line per micro batch.

        On resume, lines of steps after the checkpoint (re-done now) are dropped first, also from the
        files of ranks beyond this world size (a run resumed on fewer ranks; rank 0 trims those).
        """
        path = self.output_dir / "sample_ids" / f"rank{self.dist.rank:05d}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        paths = [path]
        if self.dist.rank == 0:
            paths += [p for p in path.parent.glob("rank*.jsonl") if int(p.stem[4:]) >= self.dist.world_size]
        for each in paths:
            kept = []
            if each.exists():
                kept = [line for line in each.read_text().splitlines() if json.loads(line)["step"] <= self.step]
            each.write_text("".join(line + "\n" for line in kept))
        return path.open("a", buffering=1)

