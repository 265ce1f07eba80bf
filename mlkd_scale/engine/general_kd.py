"""General distillation on DeepSpeed: spec → models → the stage's parts → one stage runner → export.

One object per run. Reading order: :meth:`Trainer.__init__` builds the parts (teacher, student,
objective, DeepSpeed engine, the corpus as a batch source, the held-out evaluator, checkpoints) and
hands them to a :class:`~mlkd_scale.engine.stage_runner.StageRunner`, which resumes if a checkpoint
exists and runs the loop; :meth:`Trainer.train` runs it, exports and summarises.

When the objective reads masked-language-model predictions (the distilbert preset), teacher and
student are ``AutoModelForMaskedLM`` models and every micro batch is corrupted on the CPU
(:mod:`mlkd_scale.data.corpus.mlm_masking`) before both see it; the labels go to the objective.
"""

from __future__ import annotations

import json
from pathlib import Path

import deepspeed
import torch
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoTokenizer, PreTrainedModel
from transformers import logging as hf_logging

from mlkd_scale.data.corpus.mlm_masking import BatchMasker
from mlkd_scale.engine.checkpoints.files import claim_folder
from mlkd_scale.engine.checkpoints.manager import CheckpointManager, tag_for
from mlkd_scale.engine.checkpoints.reshard import prepare_resume
from mlkd_scale.engine.deepspeed_engine import build_engine
from mlkd_scale.engine.distributed import DistInfo, init_distributed
from mlkd_scale.engine.export.hf_export import export_checkpoint
from mlkd_scale.engine.faults import is_comm_failure
from mlkd_scale.engine.stage_runner import StageParts, StageRunner
from mlkd_scale.engine.teacher_placement import place_teacher
from mlkd_scale.eval.heldout import HeldoutEval, HeldoutEvaluator
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
from mlkd_scale.models.distillation_module import MODEL_INPUTS, DistillationModule, compile_for_speed
from mlkd_scale.spec import RunSpec, SpecError, teacher_fit_problems
from mlkd_scale.spec.plan import resolve_plan


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


class CorpusBatches:
    """General distillation's batch source: packed sequences from the corpus stream, MLM-corrupted
    when the objective reads MLM labels, logged to the sample audit trail when asked."""

    def __init__(self, stream, micro_batch_size: int, device: torch.device, masker=None, sample_log=None):
        self.stream, self.micro_batch_size, self.device = stream, micro_batch_size, device
        self.masker, self.sample_log = masker, sample_log
        self._step, self._micro = 0, 0  # the masks' seed: (step, index of the micro batch within it)

    def next_batch(self, step: int) -> dict:
        self._micro = self._micro + 1 if step == self._step else 0
        self._step = step
        batch = self.stream.next_batch(self.micro_batch_size)
        if self.sample_log is not None:
            line = {"step": step, "shard": batch.get("shard"), "doc_ids": batch["doc_ids"]}
            self.sample_log.write(json.dumps(line) + "\n")
        # Packed sequences are always full, so no attention mask travels: the models then skip
        # building one and the relation losses skip masking ([B, A, L, L] work per layer).
        inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch and k != "attention_mask"}
        if self.masker is not None:  # on the CPU, before the copy: teacher and student see these ids
            inputs["input_ids"], inputs["labels"] = self.masker(batch["input_ids"], step, self._micro)
        return {k: v.to(self.device, non_blocking=True) for k, v in inputs.items()}

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)

    def log_scalars(self) -> dict[str, float]:
        """Corpus counters summed over ranks (documents read, skipped as empty, malformed) and the
        mean epoch; one small all-reduce per logging step."""
        stats = self.stream.stats()
        names = [k for k in ("documents_read", "documents_skipped", "documents_malformed") if k in stats]
        values = [float(stats[k]) for k in names] + [float(stats["epoch"])]
        totals = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(totals)
        totals = totals.tolist()
        counters = {f"data/{name}": value for name, value in zip(names, totals)}
        counters["data/epoch_mean"] = totals[-1] / torch.distributed.get_world_size()
        return counters

    def close(self) -> None:
        if self.sample_log is not None:
            self.sample_log.close()


class Trainer:
    """Stage-1 general distillation of ``spec.student`` from ``spec.teacher`` over ``spec.data``:
    builds the parts of the stage and hands them to one :class:`StageRunner`."""

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
        self.placed_teacher = place_teacher(teacher, spec.teacher, self.plan, self.dist.device)
        self.teacher = self.placed_teacher.model
        self.teacher_tap = FeatureTap(self.teacher, objective.teacher_request())
        module = DistillationModule(student, objective)
        compile_for_speed(spec.train.compile, self.teacher, module, spec.teacher.placement)
        checkpoints = CheckpointManager(
            spec.checkpoint.dir or self.output_dir / "checkpoints",
            spec.checkpoint.keep_last,
            self.dist.rank,
            self.dist.world_size,
            owner=spec.run.name,
            every_n_steps=spec.checkpoint.every_n_steps,
        )
        # Before the engine: resuming at a new world size builds it for a universal checkpoint.
        resume = prepare_resume(checkpoints, spec, self.plan.zero_stage)
        self.plan = resume.engine_plan(self.plan)
        self.engine, scheduler = build_engine(module, spec.train, self.plan)
        self.stream = resume.open_stream(spec.data, self.tokenizer)
        self.batches = CorpusBatches(self.stream, self.plan.micro_batch_size, self.dist.device, self.masker)
        evaluator = None
        if spec.eval.every_n_steps:
            heldout = HeldoutEval(spec, self.tokenizer, self.dist.device)
            evaluator = HeldoutEvaluator(heldout, spec.eval.every_n_steps, self.engine, self.teacher, self._loss,
                                         self.masker)
        parts = StageParts(
            name="general", engine=self.engine, scheduler=scheduler, loss_fn=self._loss, batches=self.batches,
            checkpoints=checkpoints, resume=resume, plan=self.plan, evaluator=evaluator,
            counted={"tokens_seen": self.plan.tokens_per_step},
        )
        self.runner = StageRunner(spec, self.dist, parts, self.output_dir)
        checkpoints.save_hf_meta(student, self.tokenizer)
        if spec.logging.record_sample_ids:
            self.batches.sample_log = self._open_sample_log()

    def _loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        labels = batch.pop("labels", None)  # the MLM labels [B, L] (-100 where nothing is predicted)
        # no_grad rather than inference_mode: the losses save teacher tensors for the student's
        # backward (e.g. the MSE target), which autograd refuses to do with inference tensors.
        with torch.no_grad():
            teacher_features = self.teacher_tap(**batch)
        return self.engine(batch, teacher_features, labels)

    def train(self) -> dict:
        """Run until the step budget (or ``stop_after_steps``); checkpoint, export, summarise.

        Raises :class:`~mlkd_scale.engine.faults.RunStopped` on preemption (after its checkpoint),
        after too many non-finite steps in a row, and when a collective with the other ranks fails.
        """
        runner = self.runner
        if self.dist.is_main:
            print(self.plan.summary(), flush=True)
            print(self.placed_teacher.describe(), flush=True)
        try:
            finished = runner.run(self.stop_after_steps, label="distilling")
            exported = None
            if finished and self.spec.checkpoint.export_at_end and self.dist.is_main:
                exported = self._export()
            torch.distributed.barrier()
        except RuntimeError as error:
            if is_comm_failure(error):
                raise runner.guard.peer_failure(error, runner.step) from error
            raise
        finally:
            self.batches.close()
        first, last = runner.first_and_last_loss()
        summary = {
            "step": runner.step,
            "finished": finished,
            "tokens_seen": runner.seen["tokens_seen"],
            "first_loss": first,
            "last_loss": last,
            "exported": str(exported) if exported else None,
        }
        if self.dist.is_main:
            self._print_summary(summary)
        return summary

    def _export(self) -> Path:
        """The student of the best checkpoint (eval.export 'best', when there is one), else of the newest."""
        best, ckpt_dir = self.runner.best, self.runner.checkpoints.ckpt_dir
        if best is not None and self.spec.eval.export == "best":
            tag_dir = ckpt_dir / tag_for(best["step"])
            return export_checkpoint(tag_dir, self.output_dir / "student", results={"heldout": best["scalars"]})
        return export_checkpoint(ckpt_dir, self.output_dir / "student")

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
                kept = [line for line in each.read_text().splitlines() if json.loads(line)["step"] <= self.runner.step]
            each.write_text("".join(line + "\n" for line in kept))
        return path.open("a", buffering=1)
