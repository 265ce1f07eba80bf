"""The sections of a general-distillation run spec: teacher, student, losses, data, train, checkpoint, ...

``LossesSpec`` lives in :mod:`mlkd_scale.spec.losses` and is re-exported here.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import (
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from mlkd_scale.spec.fields import StrictModel
from mlkd_scale.spec.losses import LossesSpec  # noqa: F401 - re-exported for older imports
from mlkd_scale.spec.trackers import TrackersMixin


class StudentSpec(StrictModel):
    """The student's architecture and initialisation.

    The attention-head count is free: it must divide the student's own width, never the teacher's.
    Vocabulary, position and type-vocabulary sizes are always taken from the teacher.
    """

    num_layers: int = Field(4, ge=1, description="Transformer layers of the student.")
    hidden_size: int = Field(312, ge=8, description="Width of the student.")
    num_heads: int = Field(12, ge=1, description="Attention heads; must divide hidden_size.")
    intermediate_size: int = Field(1200, ge=8, description="FFN inner width.")
    init: Literal["random", "teacher_layers", "path"] = Field(
        "random",
        description="random: fresh weights; teacher_layers: copy the embeddings, any head and the teacher "
        "layers init_layers names (widths must match); path: load `path`, an existing Hugging Face directory.",
    )
    path: str | None = Field(None, description="Hugging Face directory of a student, for init='path'.")
    init_layers: Literal["mapping", "every_other"] | list[int] | None = Field(
        None,
        description="init='teacher_layers' only: which teacher layers (1-based) student layers 1..N are copied "
        "from. 'mapping': losses.layer_mapping's layers; 'every_other': DistilBERT's every other layer, "
        "counted from both ends (1, 3, 5, 8, 10, 12 for 6 of 12; needs 2N <= M); or a list of N layers. "
        "None: 'every_other' for the distilbert preset, 'mapping' otherwise.",
    )

    @model_validator(mode="after")
    def _check(self) -> StudentSpec:
        if self.hidden_size % self.num_heads:
            divisors = _divisors(self.hidden_size)
            hint = ""
            if divisors:  # None for absurd widths, where listing divisors would take too long
                nearest = sorted(sorted(divisors, key=lambda h: abs(h - self.num_heads))[:3])
                hint = f", e.g. one of {nearest}"
            raise ValueError(
                f"num_heads: {self.num_heads} heads do not divide hidden_size {self.hidden_size}; "
                f"pick a head count that divides it{hint}"
            )
        if self.init == "path" and not self.path:
            raise ValueError(
                "path: init is 'path' but path is not set; give the student's Hugging Face directory"
            )
        if self.path and self.init != "path":
            raise ValueError(f"path: is set but init is '{self.init}'; set init to 'path' or drop path")
        if self.init_layers is not None and self.init != "teacher_layers":
            raise ValueError(
                f"init_layers: is set but init is '{self.init}'; set init to 'teacher_layers' or drop init_layers"
            )
        if isinstance(self.init_layers, list):
            if len(self.init_layers) != self.num_layers:
                raise ValueError(
                    f"init_layers: has {len(self.init_layers)} entries but num_layers is {self.num_layers}; "
                    "give one teacher layer per student layer, 'mapping' or 'every_other'"
                )
            if any(layer < 1 for layer in self.init_layers):
                raise ValueError(f"init_layers: teacher layers are 1-based, got {self.init_layers}; use numbers >= 1")
        return self


def _divisors(n: int, limit: int = 10**10) -> list[int] | None:
    """The divisors of ``n`` in ascending order (None when ``n`` is beyond ``limit``)."""
    if n > limit:
        return None
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return small + [n // d for d in reversed(small) if d * d != n]


class SourceSpec(StrictModel):
    """One text source of the general-distillation corpus: a hub dataset or local files."""

    name: str | None = Field(
        None, description="Hub dataset name, e.g. 'wikimedia/wikipedia' or 'bookcorpus/bookcorpus'."
    )
    config: str | None = Field(None, description="Hub dataset configuration, e.g. '20231101.en'.")
    path: str | None = Field(
        None, description="Local file, directory or glob of .txt / .jsonl / .json / .parquet files."
    )
    format: Literal["auto", "text", "json", "parquet"] = Field(
        "auto", description="Local file format; 'auto' reads it from the file suffix."
    )
    split: str = Field("train", description="Dataset split to stream.")
    weight: float = Field(1.0, gt=0, description="Relative sampling weight in the interleave.")
    text_field: str = Field("text", description="Name of the column that holds the text.")

    @model_validator(mode="after")
    def _one_origin(self) -> SourceSpec:
        if (self.name is None) == (self.path is None):
            both = "both are set" if self.name is not None else "neither is set"
            raise ValueError(
                f"each data source needs exactly one of 'name' (hub dataset) or 'path' (local files); {both}"
            )
        return self


class DataSpec(StrictModel):
    """The streamed corpus: sources, interleave, packing into full sequences."""

    sources: list[SourceSpec] = Field(min_length=1, description="Text sources, interleaved by weight.")
    max_seq_length: int = Field(
        128, ge=8, description="Tokens per packed sequence, [CLS] and [SEP] included."
    )
    shuffle_buffer: int = Field(
        1000, ge=0, description="Documents held in the shuffle buffer (saved in checkpoints); 0 = no shuffle."
    )
    pretokenized_dir: str | None = Field(
        None,
        description="Train from this directory, written from these sources by `mlkd-scale pretokenize SPEC` "
        "(tokenized and packed once, by many processes) instead of tokenizing while training: far faster "
        "input, a global shuffle of all sequences every epoch (shuffle_buffer is then unused), and exact "
        "resume at any world size. None = stream and tokenize the sources during training.",
    )
    mlm_probability: float = Field(
        0.15,
        gt=0,
        lt=1,
        description="Share of the non-special tokens picked for masked-language modelling (80 % [MASK], 10 % a "
        "random token, 10 % kept; mlkd_scale/data/corpus/mlm_masking.py) in runs whose loss terms read MLM "
        "predictions (the distilbert preset's stage 1); unused otherwise.",
    )
    heldout_fraction: float = Field(
        0.0,
        ge=0,
        le=0.5,
        description="Share of the documents never trained on, kept for eval.every_n_steps; chosen by a hash of "
        "(run.seed, document id), so the same documents at any world size and after any resume (a hub source "
        "needs an `id` column for stable ids). Streamed corpora only. 0: every document is trained on.",
    )
    stream_shards: int | None = Field(
        None,
        ge=1,
        description="Fixed number of data shards the corpus is split into, whatever the world size: rank r "
        "reads the shards v with v % world_size == r, so a run can resume at another world size (up to this "
        "many ranks). Unset = the world size of the run's first launch. Fixed for a run (recorded in its "
        "checkpoints): set it at the start to the largest world size you may resume at. Streamed sources only: "
        "a pretokenized corpus resumes exactly at any world size.",
    )


class EvalSpec(StrictModel):
    """Evaluation during general distillation, on documents held out of the corpus (never trained on)."""

    every_n_steps: int | None = Field(
        None,
        ge=1,
        description="Evaluate every N optimizer steps (and at the end): the Stage-1 loss on the documents "
        "data.heldout_fraction holds out and the agreement with the teacher (as `mlkd-scale agreement` "
        "computes it). Unset: off.",
    )
    max_documents: int = Field(
        128, ge=4, description="Held-out documents evaluated (the first ones met in corpus order)."
    )
    metric: Literal["agreement", "loss"] = Field(
        "agreement",
        description="What picks the best checkpoint: agreement (higher is better) or the held-out Stage-1 loss "
        "(lower is better). The best is pinned against keep_last pruning and kept across resumes.",
    )
    export: Literal["best", "last"] = Field(
        "best", description="Which checkpoint the end-of-run export writes."
    )


class CheckpointSpec(StrictModel):
    """Sharded DeepSpeed checkpoints of the student and the exact data position."""

    every_n_steps: int = Field(
        1000, ge=1, description="Write a checkpoint every N optimizer steps (and at the end)."
    )
    keep_last: int = Field(3, ge=1, description="Keep the newest K complete checkpoints, delete older ones.")
    resume: str = Field(
        "auto",
        description="'auto': continue from the newest complete checkpoint in the run's checkpoint dir if any; "
        "'never': start fresh (an existing checkpoint dir is an error); or a path to a checkpoint tag dir.",
    )
    dir: str | None = Field(None, description="Checkpoint directory; default <run.output_dir>/checkpoints.")
    export_at_end: bool = Field(True, description="Write the student as a Hugging Face directory at the end.")


class FaultsSpec(StrictModel):
    """What a run does on preemption, a lost rank and non-finite numbers (mlkd_scale/engine/faults.py)."""

    preemption_grace_s: float = Field(
        25.0,
        gt=0,
        description="Seconds from SIGTERM/SIGUSR1 until the ranks have finished their step, written a "
        "checkpoint and exited (status 75); past it they exit anyway (status 76) and `latest` keeps the "
        "previous checkpoint. Keep it below the scheduler's kill delay (Slurm KillWait/GraceTime, "
        "Kubernetes terminationGracePeriodSeconds, 30 s in DeepSpeed's launch.py).",
    )
    collective_timeout_s: float = Field(
        600.0,
        gt=0,
        description="Timeout of every collective (init_process_group): a rank stuck on a dead peer fails "
        "after it (status 4) instead of hanging. Must exceed the slowest checkpoint write.",
    )
    max_nonfinite_steps: int = Field(
        20,
        ge=1,
        description="Optimizer steps with non-finite loss or gradients are skipped (weights and optimizer "
        "untouched) and counted (train/nonfinite_steps_skipped); this many in a row stop the run (status 3) "
        "without writing a checkpoint. fp16's loss scaler skips a few steps while it calibrates; keep it "
        "above that.",
    )


class LoggingSpec(TrackersMixin):
    """Experiment trackers (report_to: TensorBoard, MLflow, W&B) and console logging, rank 0 only."""

    every_n_steps: int = Field(10, ge=1, description="Log scalars every N optimizer steps.")
    tensorboard_dir: str | None = Field(
        None, description="Event file directory; default <run.output_dir>/tensorboard."
    )
    progress_bar: bool = Field(True, description="Show a progress bar on rank 0.")
    record_sample_ids: bool = Field(
        False,
        description="Every rank appends the ids of the documents it trains on to "
        "<run.output_dir>/sample_ids/rank<R>.jsonl (an audit trail: no document lost or repeated).",
    )


class RunInfo(StrictModel):
    """Identity of a run: where its outputs go and which seed makes it reproducible."""

    name: str = Field("mlkd", min_length=1, description="Run name; names the default output directory.")
    output_dir: str = Field(
        "",
        validate_default=True,
        description="Directory for checkpoints, TensorBoard events and the exported student; "
        "empty = outputs/<name>.",
    )
    seed: int = Field(42, description="Seed of every random number generator (data order, init, dropout).")

    @field_validator("output_dir")
    @classmethod
    def _default_output_dir(cls, value: str, info: ValidationInfo) -> str:
        # Resolved here (not in the engine) so the printed plan and the spec hash show the real place.
        return value or f"outputs/{info.data.get('name', 'mlkd')}"


class TeacherSpec(StrictModel):
    """The teacher: a BERT-like encoder that is never trained, only read."""

    path: str = Field(
        description="Local Hugging Face model directory (with config.json) or a hub name such as "
        "'bert-base-uncased'."
    )
    dtype: Literal["bf16", "fp16", "fp32"] = Field(
        "bf16", description="Dtype the teacher runs in; relations are still computed in fp32."
    )
    placement: Literal["replicate", "zero3"] = Field(
        "replicate",
        description="replicate: a full copy per rank under inference_mode; zero3: parameters partitioned "
        "across ranks by a ZeRO-3 engine without optimizer, for teachers too big for one device.",
    )
    cache: bool = Field(
        True,
        description="Task distillation: compute the teacher's outputs once per stage (per teacher, data, "
        "max length and what the losses read), store them under <run.output_dir>/teacher_cache and read "
        "them in every epoch instead of running the teacher (mlkd_scale/engine/task/teacher_cache.py); false "
        "runs the teacher on every batch. General distillation never caches (its corpus is streamed).",
    )
    cache_max_gib: float = Field(
        4.0,
        ge=0,
        description="Largest total size (GiB, all ranks together) of the per-token features a stage may "
        "cache (embeddings, hidden states, context vectors, Q/K/V, attention maps, in cache_dtype); a stage "
        "whose features are larger runs the live teacher and says why. [CLS] and logits are cached "
        "whatever this says; 0 caches no per-token features.",
    )
    cache_dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto",
        description="Dtype of cached per-token features: auto = teacher.dtype when it is bf16/fp16 (the "
        "live teacher's values exactly), fp16 for an fp32 teacher (half the bytes, each value rounded to "
        "11 significant bits). [CLS] and logits are stored in teacher.dtype.",
    )


class TrainSpec(StrictModel):
    """Batching, step budget, optimizer (AdamW) and schedule; DeepSpeed is filled from these."""

    micro_batch_size: int = Field(32, ge=1, description="Sequences per rank per forward/backward.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro batches per optimizer step.")
    global_batch_size: int | None = Field(
        None,
        ge=1,
        description="Optional cross-check: sequences per optimizer step over all ranks; must equal "
        "micro_batch_size x gradient_accumulation_steps x world size.",
    )
    max_steps: int | None = Field(
        None, ge=1, description="Optimizer steps to train; exclusive with token_budget."
    )
    token_budget: int | None = Field(
        None,
        ge=1,
        description="Tokens to train on; steps = ceil(token_budget / tokens per step). "
        "Exclusive with max_steps.",
    )
    lr: float = Field(1e-4, gt=0, description="Peak learning rate of AdamW.")
    warmup_steps: int | None = Field(None, ge=0, description="Linear warm-up steps; wins over warmup_ratio.")
    warmup_ratio: float = Field(0.01, ge=0, lt=1, description="Warm-up as a fraction of the total steps.")
    decay: Literal["linear", "cosine", "constant"] = Field(
        "linear", description="Learning-rate decay after warm-up."
    )
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Final learning rate as a fraction of lr.")
    weight_decay: float = Field(
        0.01, ge=0, description="AdamW weight decay (not applied to biases/LayerNorm)."
    )
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW (beta1, beta2), each in [0, 1).")
    adam_eps: float = Field(1e-6, gt=0, description="AdamW epsilon.")
    grad_clip: float = Field(1.0, ge=0, description="Gradient-norm clipping threshold; 0 = off.")
    precision: Literal["bf16", "fp16", "fp32"] = Field(
        "bf16",
        description="Mixed precision of the student. If not set here, a bf16/fp16 section of the DeepSpeed "
        "config decides.",
    )
    compile: Literal["off", "objective", "all"] = Field(
        "off",
        description="torch.compile: 'objective' compiles the losses and projections (the relation "
        "softmax/KL and MSE work fused into fewer kernels), 'all' also the student and a replicated "
        "teacher. The first steps then spend minutes compiling; compare with benchmarks/throughput.py "
        "--compile on your hardware before a long run.",
    )
    zero_stage: Literal[0, 1, 2, 3] = Field(
        2,
        description="ZeRO stage of the student's engine. If not set here, the DeepSpeed config's "
        "zero_optimization.stage decides.",
    )

    @field_validator("adam_betas")
    @classmethod
    def _betas_in_range(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(
                f"each beta must be in [0, 1), got {list(betas)}; the usual values are [0.9, 0.999]"
            )
        return betas

    @model_validator(mode="after")
    def _one_budget(self) -> TrainSpec:
        # "Neither is set" is checked by RunSpec: a task run takes its budget from task.stage1/stage2.
        if self.max_steps is not None and self.token_budget is not None:
            raise ValueError(
                "set exactly one of max_steps (optimizer steps) or token_budget (tokens); both are set"
            )
        return self



class DeepSpeedSpec(StrictModel):
    """Extra DeepSpeed settings the spec does not own (offload, communication, bucket sizes, ...)."""

    config: str | dict[str, Any] | None = Field(
        None,
        description="Path of a DeepSpeed JSON file (looked up as given, then in the repo's ds_configs/) "
        "or an "
        "inline dict. Batch sizes, clipping, precision and ZeRO stage come from the spec; a different value "
        "here is an error, and optimizer/scheduler sections are not allowed.",
    )
