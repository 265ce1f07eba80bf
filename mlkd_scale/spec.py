"""The run spec: every knob of a distillation run, validated by Pydantic v2.

Each UNKNOWN of the MLKD-BERT paper (see ``shared/paper/mlkd-bert-method.md`` §9) is a field here
with the documented default, so a user can switch readings without code changes.
Unknown keys are rejected everywhere (``extra="forbid"``).

The spec is the single source of truth of a run: batch sizes, learning rate, precision and ZeRO
stage live here, and the DeepSpeed JSON is filled from it (see :mod:`mlkd_scale.plan`). Bad input
never surfaces as a traceback: :func:`load_spec` gathers every problem (types, unknown keys,
cross-field rules, files that must exist) into one :class:`SpecError`, so a user fixes a spec in
one pass.

Validator messages follow one convention so :class:`SpecError` can name the dotted field path:
a message line ``"field: text"`` is reported under ``<section path>.field``, any other line under
the section itself.
"""

from __future__ import annotations

import difflib
import glob
import hashlib
import json
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

#: The repository's DeepSpeed config directory; a relative ``deepspeed.config`` is also looked up here.
DS_CONFIG_DIR = Path(__file__).resolve().parent.parent / "ds_configs"


#: Largest integer a spec accepts anywhere (int64: what torch, numpy and DeepSpeed can hold).
MAX_INT = 2**63 - 1


def _wants_number(annotation: Any) -> bool:
    """Whether a field (or container element) annotation is a number and not a bool."""
    if annotation in (int, float):
        return True
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return bool(args) and all(isinstance(a, int) and not isinstance(a, bool) for a in args)
    if origin in (Union, types.UnionType):
        return bool not in args and any(_wants_number(a) for a in args)
    return False


def _number_problem(annotation: Any, value: Any) -> str | None:
    """A boolean where a number belongs (Pydantic would read ``true`` as 1), or an int beyond int64."""
    if isinstance(value, bool):
        return "expected a number, got a boolean; write the number" if _wants_number(annotation) else None
    if isinstance(value, int):
        if abs(value) > MAX_INT and _wants_number(annotation):
            return f"a number with {len(str(abs(value)))} digits is too large; numbers must fit in 64 bits"
        return None
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        for member in args:
            problem = _number_problem(member, value)
            if problem:
                return problem
        return None
    if origin in (list, tuple) and isinstance(value, (list, tuple)) and args:
        elements = args[:1] * len(value) if origin is list or args[-1] is Ellipsis else args
        for member, item in zip(elements, value):
            problem = _number_problem(member, item)
            if problem:
                return problem
    if origin is dict and isinstance(value, dict) and len(args) == 2:
        for item in value.values():
            problem = _number_problem(args[1], item)
            if problem:
                return problem
    return None


class StrictModel(BaseModel):
    """Base for every spec section: unknown keys are errors, values are re-validated on assignment.

    Numbers must be finite (NaN and infinities are refused), a boolean is never read as a number
    (``micro_batch_size: true`` would otherwise silently be 1), and integers must fit in 64 bits.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _plain_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None or isinstance(value, (str, float)):  # the common case, kept cheap
            return value
        field = cls.model_fields.get(info.field_name) if info.field_name else None
        problem = _number_problem(field.annotation, value) if field is not None else None
        if problem:
            raise ValueError(problem)
        return value


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
        description="random: fresh weights; teacher_layers: copy the embeddings and the mapped teacher "
        "layers (widths must match); path: load `path`, an existing Hugging Face directory.",
    )
    path: str | None = Field(None, description="Hugging Face directory of a student, for init='path'.")

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
        return self


def _divisors(n: int, limit: int = 10**10) -> list[int] | None:
    """The divisors of ``n`` in ascending order (None when ``n`` is beyond ``limit``)."""
    if n > limit:
        return None
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return small + [n // d for d in reversed(small) if d * d != n]


class LossesSpec(StrictModel):
    """Which distillation objective to run, and every reading the paper leaves open.

    Term names per preset and stage (stage 1 = embedding + Transformer layers, stage 2 = prediction):

    ========== ========================= ==========================
    preset     stage 1                   stage 2
    ========== ========================= ==========================
    mlkd       emb, mha, ffn             ss, sc, kd
    tinybert   emb, attn, hidden         kd  (soft cross-entropy)
    minilmv2   qq, kk, vv                kd
    distilbert cos                       kd, cos
    ========== ========================= ==========================
    """

    preset: Literal["mlkd", "tinybert", "minilmv2", "distilbert"] = "mlkd"
    weights: dict[str, float] = Field(
        default_factory=dict,
        description="Per-term weight by term name (see the table above); terms not named get 1.0, "
        "a weight of 0 switches a term off.",
    )
    layer_mapping: Literal["uniform"] | list[int] = Field(
        "uniform",
        description="'uniform': student layer n (1..N) learns from teacher layer floor(n*M/N); or an explicit "
        "list of N teacher layers (1-based). Embeddings always map to embeddings.",
    )
    mha_splits: int | None = Field(
        None,
        ge=1,
        description="A_s, the number of MHA-splits of the concatenated head context (paper §2.2). "
        "None: the student's head count (the paper's primary reading). Must divide both widths.",
    )
    mask_padding: bool = Field(
        True, description="Mask padded keys out of token relations and padded rows out of the averages."
    )
    projection: Literal["per_layer", "shared"] = Field(
        "per_layer",
        description="W_h for L_FFN: one student->teacher projection per mapped layer, or one shared.",
    )
    kd_temperature: float = Field(1.0, gt=0, description="tau of the soft-label KD loss.")
    kd_scale_by_t2: bool = Field(True, description="Multiply the soft-label KD loss by tau^2.")
    contrastive_temperature: float = Field(0.2, gt=0, description="tau of the sample-contrastive loss L_SC.")
    contrastive_projection: bool = Field(
        True,
        description="Project the student [CLS] to teacher width with the last layer's W_h before L_SC "
        "(prototype's reading); False requires equal widths.",
    )
    regression_contrastive: Literal["off", "bins"] = Field(
        "off",
        description="L_SC for regression tasks (STS-B): 'off' drops it, 'bins' uses rounded scores as labels.",
    )
    relation_heads: int = Field(48, ge=1, description="minilmv2 preset: relation heads A_r.")
    relation_teacher_layer: int | None = Field(
        None, ge=1, description="minilmv2 preset: teacher layer (1-based) to distil from; None = last."
    )

    @field_validator("weights")
    @classmethod
    def _weights_not_negative(cls, weights: dict[str, float]) -> dict[str, float]:
        negative = {name: w for name, w in weights.items() if w < 0}
        if negative:
            raise ValueError(f"loss weights must be >= 0 (0 switches a term off), got {negative}")
        return weights


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
    stream_shards: int | None = Field(
        None,
        ge=1,
        description="Fixed number of data shards the corpus is split into, whatever the world size: rank r "
        "reads the shards v with v % world_size == r, so a run can resume at another world size (up to this "
        "many ranks). Unset = the world size of the run's first launch. Fixed for a run (recorded in its "
        "checkpoints): set it at the start to the largest world size you may resume at. Streamed sources only: "
        "a pretokenized corpus resumes exactly at any world size.",
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


class LoggingSpec(StrictModel):
    """TensorBoard and console logging, rank 0 only."""

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


_EPOCHS = "Passes over the stage's training data; ignored when max_steps is set."
_LR = "Peak learning rate of AdamW in this stage."


class StageBudget(StrictModel):
    """Budget and learning rate of one stage of a task run (teacher fine-tuning, Stage 1, Stage 2).

    Steps = ceil(epochs x train examples / global batch), or ``max_steps`` when set (it wins, as in
    Hugging Face's Trainer). The train size is only known once the data is read, so the engine
    prints the steps at start. Defaults per stage follow the paper's §6 template (TinyBERT).
    """

    epochs: float = Field(3.0, gt=0, description=_EPOCHS)
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps of the stage; wins over epochs.")
    lr: float = Field(3e-5, gt=0, description=_LR)
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="Linear warm-up as a fraction of the stage's steps.")


class FinetuneBudget(StageBudget):
    """Teacher fine-tuning (launchers/finetune_teacher.py): BERT's usual 3 epochs at 2e-5."""

    lr: float = Field(2e-5, gt=0, description=_LR)


class Stage1Budget(StageBudget):
    """Stage 1 (embedding + Transformer layers): TinyBERT's lr 5e-5; 10 epochs (TinyBERT's large-task
    setting; it uses 20 on small tasks, 50 on CoLA, on augmented data)."""

    epochs: float = Field(10.0, gt=0, description=_EPOCHS)
    lr: float = Field(5e-5, gt=0, description=_LR)


class Stage2Budget(StageBudget):
    """Stage 2 (prediction layer): TinyBERT's 3 epochs at lr 3e-5 (it picks from 1e-5..3e-5 on dev)."""


class SquadSpec(StrictModel):
    """SQuAD settings of a task run (``task.name`` 'squad_v1' or 'squad_v2'); defaults of BERT's ``run_squad.py``.

    Data: ``train_file``/``dev_file`` (official JSON), else ``task.data_dir`` holding the official
    names (``train-v1.1.json``/``dev-v1.1.json``, ``train-v2.0.json``/``dev-v2.0.json``), else the
    hub copy (``rajpurkar/squad`` / ``rajpurkar/squad_v2``, splits train/validation).

    Reported dev metrics (percent, official scripts' rules): ``exact``, ``f1`` with the fixed
    ``null_score_threshold`` (v2.0 also ``HasAns_*``/``NoAns_*``); v2.0 adds ``best_exact``/``best_f1``
    with the threshold tuned on dev itself (``best_*_thresh``), as the official v2.0 script does.
    Checkpoints are selected on the fixed-threshold ``selection_metric`` (the tuned one is optimistic).
    """

    train_file: str | None = Field(None, description="Official-format train JSON (e.g. train-v2.0.json).")
    dev_file: str | None = Field(None, description="Official-format dev JSON (e.g. dev-v2.0.json).")
    doc_stride: int = Field(
        128, ge=0, description="Context tokens shared by two consecutive windows of a long paragraph."
    )
    max_query_length: int = Field(64, ge=1, description="Question tokens kept (longer questions are cut).")
    n_best: int = Field(20, ge=1, description="Top start and top end logits paired per window.")
    max_answer_length: int = Field(30, ge=1, description="Longest predicted answer, in tokens.")
    null_score_threshold: float = Field(
        0.0,
        description="v2.0: answer '' when null score - best span score > this (the reported exact/f1); "
        "best_exact/best_f1 report the threshold tuned on dev alongside.",
    )
    selection_metric: Literal["f1", "exact"] = Field(
        "f1", description="Dev metric (fixed threshold) that picks the best checkpoint."
    )


class TaskSpec(StrictModel):
    """Task distillation (and teacher fine-tuning) on a GLUE task or SQuAD instead of a general corpus.

    ``teacher.path`` is a fine-tuned task model for ``launchers/task_kd.py`` and a pre-trained encoder
    for ``launchers/finetune_teacher.py``. The budgets replace train.max_steps/token_budget/lr/warm-up.
    """

    name: str = Field(
        description="GLUE task, any spelling: 'SST-2', 'sst2', 'MNLI', 'sts-b', ...; or SQuAD: 'squad_v1' "
        "('squad', 'SQuAD1.1', ...), 'squad_v2' ('squad2', 'SQuAD v2.0', ...)"
    )
    data_dir: str | None = Field(
        None,
        description="The task's folder in the original GLUE layout (glue_data/<TASK> with train.tsv, "
        "dev.tsv; MNLI dev_matched.tsv/dev_mismatched.tsv); None = the hub copy nyu-mll/glue. SQuAD: the "
        "folder of the official JSON files (see task.squad).",
    )
    max_seq_length: int = Field(
        128,
        ge=8,
        description="Tokens per example, [CLS]/[SEP] included (padded/truncated); SQuAD: per window, "
        "default 384 there.",
    )
    squad: SquadSpec | None = Field(
        None, description="SQuAD settings (SQuAD tasks only; defaults filled in when unset)."
    )
    augmented_dir: str | None = Field(
        None,
        description="A finished augmentation cache (launchers/augment.py --out) used as Stage-1 training "
        "data; Stage 2 and teacher fine-tuning always use the original train split.",
    )
    stages: list[Literal[1, 2]] = Field(
        default_factory=lambda: [1, 2], min_length=1, description="Stages to run, in order: [1, 2], [1], [2]."
    )
    finetune: FinetuneBudget = Field(
        default_factory=FinetuneBudget, description="Teacher fine-tuning budget."
    )
    stage1: Stage1Budget = Field(default_factory=Stage1Budget, description="Stage-1 budget.")
    stage2: Stage2Budget = Field(default_factory=Stage2Budget, description="Stage-2 budget.")
    eval_every_n_steps: int | None = Field(
        None, ge=1, description="Evaluate on dev (and checkpoint) every N steps of a stage; always at its end."
    )
    eval_batch_size: int = Field(64, ge=1, description="Dev examples per rank per forward.")

    @field_validator("name")
    @classmethod
    def _known_task(cls, value: str) -> str:
        from mlkd_scale.data.glue import get_task
        from mlkd_scale.data.squad_task import squad_task_name

        squad = squad_task_name(value)
        if squad is not None:
            return squad  # 'squad_v1' or 'squad_v2'
        try:
            return get_task(value).name  # GLUE's own spelling
        except ValueError as error:
            raise ValueError(f"{error}, or SQuAD: squad_v1, squad_v2") from None

    @property
    def is_squad(self) -> bool:
        return self.name.startswith("squad_")

    @model_validator(mode="before")
    @classmethod
    def _squad_defaults(cls, data: Any) -> Any:
        """SQuAD runs get a squad section with its defaults and windows of 384 tokens unless set."""
        if isinstance(data, dict) and isinstance(data.get("name"), str):
            from mlkd_scale.data.squad_task import squad_task_name

            if squad_task_name(data["name"]) is not None:
                data = {**data, "max_seq_length": data.get("max_seq_length", 384), "squad": data.get("squad") or {}}
        return data

    @model_validator(mode="after")
    def _squad_settings(self) -> TaskSpec:
        if not self.is_squad:
            if self.squad is not None:
                raise ValueError(f"squad: only SQuAD tasks take it ({self.name} is GLUE); remove it")
            return self
        problems = []
        if self.augmented_dir is not None:
            problems.append(
                "augmented_dir: not available for SQuAD (word replacement would move the answer spans); unset it"
            )
        room = self.max_seq_length - self.squad.max_query_length - 4  # 4: the most special tokens of a pair
        if self.squad.doc_stride >= room:
            problems.append(
                f"squad.doc_stride: {self.squad.doc_stride} must be below max_seq_length - "
                f"squad.max_query_length - 4 = {room} (the context tokens of a window); lower it or raise "
                "max_seq_length"
            )
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @field_validator("stages")
    @classmethod
    def _ordered_stages(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value) or value != sorted(value):
            raise ValueError(f"list each stage once, in order: [1, 2], [1] or [2]; got {value}")
        return value


class DeepSpeedSpec(StrictModel):
    """Extra DeepSpeed settings the spec does not own (offload, communication, bucket sizes, ...)."""

    config: str | dict[str, Any] | None = Field(
        None,
        description="Path of a DeepSpeed JSON file (looked up as given, then in the repo's ds_configs/) "
        "or an "
        "inline dict. Batch sizes, clipping, precision and ZeRO stage come from the spec; a different value "
        "here is an error, and optimizer/scheduler sections are not allowed.",
    )


class RunSpec(StrictModel):
    """A whole run. Load it with :func:`load_spec`, turn it into numbers with :func:`resolve_plan`."""

    run: RunInfo = Field(default_factory=RunInfo, description="Run name, output directory, seed.")
    teacher: TeacherSpec = Field(description="The teacher model.")
    student: StudentSpec = Field(default_factory=StudentSpec, description="The student's architecture.")
    losses: LossesSpec = Field(default_factory=LossesSpec, description="The distillation objective.")
    data: DataSpec | None = Field(
        None, description="The general-distillation corpus (general runs; exclusive with task)."
    )
    task: TaskSpec | None = Field(
        None, description="The task of a task-distillation or teacher fine-tuning run (exclusive with data)."
    )
    train: TrainSpec = Field(description="Batching, budget, optimizer, schedule, precision, ZeRO stage.")
    deepspeed: DeepSpeedSpec = Field(default_factory=DeepSpeedSpec, description="Extra DeepSpeed settings.")
    checkpoint: CheckpointSpec = Field(
        default_factory=CheckpointSpec, description="Checkpointing and resume."
    )
    logging: LoggingSpec = Field(default_factory=LoggingSpec, description="TensorBoard and console logging.")
    faults: FaultsSpec = Field(
        default_factory=FaultsSpec, description="Preemption grace period, collective timeout, non-finite steps."
    )

    @model_validator(mode="after")
    def _cross_section(self) -> RunSpec:
        # Rules that span sections. The teacher's layer count and width are only known once its
        # config is loaded, so the range of layer_mapping and mha_splits vs the teacher are checked there.
        problems = _run_kind_problems(self)
        width, splits = self.student.hidden_size, self.losses.mha_splits
        if splits is not None and width % splits:
            problems.append(
                f"losses.mha_splits: {splits} does not divide student.hidden_size {width}; "
                "pick a divisor of the width or leave it unset (= the student's head count)"
            )
        if self.task is not None and self.task.is_squad and self.losses.weights.get("sc", 0) > 0:
            problems.append(
                "losses.weights: sc (sample-contrastive) needs class labels, which SQuAD has not; "
                "remove 'sc' (it is off for SQuAD by default)"
            )
        mapping = self.losses.layer_mapping
        if isinstance(mapping, list):
            if len(mapping) != self.student.num_layers:
                problems.append(
                    f"losses.layer_mapping: has {len(mapping)} entries but student.num_layers is "
                    f"{self.student.num_layers}; give one teacher layer per student layer, or 'uniform'"
                )
            if any(layer < 1 for layer in mapping):
                problems.append(
                    f"losses.layer_mapping: teacher layers are 1-based, got {mapping}; use numbers >= 1"
                )
        if problems:
            raise ValueError("\n".join(problems))
        return self


#: train fields a task run takes from its stage budgets instead (task.finetune/stage1/stage2).
_TASK_OWNED_TRAIN = {
    "max_steps": "task.<stage>.max_steps or task.<stage>.epochs",
    "token_budget": "task.<stage>.max_steps or task.<stage>.epochs",
    "lr": "task.<stage>.lr",
    "warmup_steps": "task.<stage>.warmup_ratio",
    "warmup_ratio": "task.<stage>.warmup_ratio",
}


def _run_kind_problems(spec: RunSpec) -> list[str]:
    """A run is general (a data section) or task (a task section), never both; budgets follow the kind."""
    if (spec.data is None) == (spec.task is None):
        state = "both are set" if spec.data is not None else "neither is set"
        return [
            (
                f"data: a run needs exactly one of 'data' (general distillation corpus) or 'task' (task "
                f"distillation / teacher fine-tuning on a GLUE task); {state}"
            )
        ]
    train = spec.train
    if spec.task is None:
        if train.max_steps is None and train.token_budget is None:
            return [
                "train: set exactly one of max_steps (optimizer steps) or token_budget (tokens); neither is set"
            ]
        return []
    return [
        f"train.{name}: a task run takes it from {where} (per stage); remove it from train"
        for name, where in _TASK_OWNED_TRAIN.items()
        if name in train.model_fields_set
    ]


# --------------------------------------------------------------------------------------------------
# Errors for users
# --------------------------------------------------------------------------------------------------


class SpecError(Exception):
    """Everything wrong with a spec, one line per problem, each naming the field or file and the fix.

    Raised once with all problems so a user fixes the spec in one pass; never a traceback for bad input.
    """

    def __init__(self, problems: list[str] | str):
        problems = [problems] if isinstance(problems, str) else list(problems)
        # One problem is one line: user text quoted in a message (a path with a newline, a key with
        # a NUL byte) is escaped, so a line never breaks or hides what follows.
        self.problems = [one_line(str(p)) for p in problems]
        super().__init__("\n".join(self.problems))

    def __str__(self) -> str:
        return "\n".join(self.problems)


def one_line(text: str) -> str:
    """``text`` with line breaks and other non-printable characters escaped (``\\n``, ``\\x00``)."""
    if text.isprintable():
        return text
    return "".join(
        ch if ch.isprintable() else ch.encode("unicode_escape", "backslashreplace").decode("ascii")
        for ch in text
    )


_PLAIN_KEY = re.compile(r"^[\w\-]+$")


def _key_text(key: Any) -> str:
    """A key as a part of a dotted path: as is when plain, else quoted (``run."my key"``, ``""``)."""
    key = str(key)
    return key if _PLAIN_KEY.match(key) else json.dumps(key, ensure_ascii=False)


_FIELD_LINE = re.compile(r"^([A-Za-z_][\w.]*): (.*)$", re.DOTALL)


def _union_members(annotation: Any) -> list[Any]:
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return [a for a in typing.get_args(annotation) if a is not type(None)]
    return [annotation]


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The spec section inside an annotation (``X``, ``X | None``, ``list[X]``), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _walk_loc(loc: tuple, is_extra: bool) -> tuple[list[str], type[BaseModel] | None, bool]:
    """Turn a Pydantic error location into a dotted path, dropping union-branch tags.

    Returns the path parts, the section model that owns the last key (for "allowed keys" hints)
    and whether a union tag was dropped (so errors of the branches can be merged into one line).
    """
    parts: list[str] = []
    model: type[BaseModel] | None = RunSpec
    owner: type[BaseModel] | None = RunSpec
    expect_tag = tagged = False
    for i, part in enumerate(loc):
        if isinstance(part, int):
            parts.append(str(part))
            continue
        if expect_tag:
            expect_tag, tagged, model = False, True, None
            continue
        if model is not None and part in model.model_fields:
            annotation = model.model_fields[part].annotation
            parts.append(part)
            owner = model
            model = _model_in(annotation)
            expect_tag = len(_union_members(annotation)) > 1
            continue
        parts.append(_key_text(part))  # an unknown key (extra_forbidden) or a dict key
        owner = model if is_extra and i == len(loc) - 1 else None
        model = None
    return parts, owner, tagged


def _short(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _describe(err: dict) -> list[tuple[str, str, bool]]:
    """(path, message, from a union branch) for one Pydantic error."""
    kind = err["type"]
    is_extra = kind == "extra_forbidden"
    parts, owner, tagged = _walk_loc(tuple(err["loc"]), is_extra)
    path = ".".join(parts)
    if kind == "value_error":
        text = str(err.get("ctx", {}).get("error", err["msg"]))
        out = []
        for line in text.splitlines() or [text]:
            m = _FIELD_LINE.match(line)
            if m:  # "field: text" from one of our validators, relative to the section
                field = m.group(1)
                full = field if not path or field.startswith(path + ".") else f"{path}.{field}"
                out.append((full, m.group(2), False))
            else:
                out.append((path, line, False))
        return out
    if is_extra:
        key = str(err["loc"][-1])
        allowed = sorted(owner.model_fields) if owner is not None else []
        close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.7)
        hint = f"did you mean '{close[0]}'? " if close else ""
        return [(path, f"unknown key; {hint}allowed keys are: {', '.join(allowed)}", False)]
    if kind == "missing":
        field = owner.model_fields.get(parts[-1]) if owner is not None and parts else None
        what = "section" if field is not None and _model_in(field.annotation) is not None else "key"
        return [(path, f"required {what} is missing; add it (see `mlkd-scale schema`)", False)]
    message = err["msg"]
    if not tagged and not isinstance(err.get("input"), dict):
        message += f" (got {_short(err.get('input'))})"
    return [(path, message, tagged)]


def format_validation_error(exc: ValidationError) -> list[str]:
    """Problems of a :class:`RunSpec` ValidationError as ``"dotted.path: message"`` lines.

    Errors of the branches of a union (``'uniform' | list[int]``) are merged into one line, since
    "Input should be 'uniform'" and "Input should be a valid list" are two halves of one mistake.
    """
    lines: list[str] = []
    unions: dict[str, tuple[int, list[str], Any]] = {}  # path -> (line index, branch messages, input)
    for err in exc.errors():
        for path, message, tagged in _describe(err):
            label = path or "(top level)"
            if not tagged:
                lines.append(f"{label}: {message}")
            elif path in unions:
                unions[path][1].append(message)
            else:
                unions[path] = (len(lines), [message], err.get("input"))
                lines.append("")
    for path, (index, messages, given) in unions.items():
        first, rest = messages[0], [m.removeprefix("Input should be ") for m in messages[1:]]
        got = "" if isinstance(given, dict) else f" (got {_short(given)})"
        lines[index] = f"{path}: {' or '.join([first, *rest])}{got}"
    return lines


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that refuses duplicate keys (PyYAML would silently keep the last one).

    It also stops at flow collections (``[...]``, ``{...}``) nested deeper than :data:`MAX_DEPTH`:
    PyYAML's scanner slows down quadratically with the nesting and its composer recurses, so
    ``[[[[...]]]]`` 3000 deep would take seconds before failing with a RecursionError.
    """

    def fetch_flow_collection_start(self, TokenClass: type) -> None:
        if self.flow_level >= MAX_DEPTH:
            raise yaml.scanner.ScannerError(
                None, None, f"brackets nested more than {MAX_DEPTH} levels deep", self.get_mark()
            )
        super().fetch_flow_collection_start(TokenClass)


def _construct_unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: merged keys may be overridden
            continue
        key = loader.construct_object(key_node, deep=deep)
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"a {type(key).__name__} is used as a key; keys must be strings",
                key_node.start_mark,
            ) from None
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}; keep only one", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def _json_unique(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}; keep only one")
        out[key] = value
    return out


#: Limits on what a spec file may hold: no real spec comes near them, and they keep a hostile or
#: broken file (a YAML "billion laughs", a list nested 100000 deep) from hanging or crashing a check.
MAX_SPEC_BYTES = 16 * 2**20
MAX_DEPTH = 50
MAX_VALUES = 100_000
_YAML_KINDS = {
    "date": "a date (quote it to make it text)",
    "datetime": "a timestamp (quote it to make it text)",
    "bytes": "binary data (!!binary)",
    "set": "a set (!!set; use a list)",
    "tuple": "an ordered pair (!!omap/!!pairs; use a mapping)",
}


class _TooMany(Exception):
    pass


def structure_problems(data: Any, limit: int = 20) -> list[str]:
    """Values no spec can hold, as ``"dotted.path: problem"`` lines (at most ``limit``).

    JSON and YAML can express things Pydantic and DeepSpeed cannot take: nesting deeper than
    :data:`MAX_DEPTH`, more than :data:`MAX_VALUES` values once YAML aliases are expanded, a value
    that contains itself (``&a [*a]``), keys that are not strings (``1: x``, ``null: x``), YAML-only
    values (dates, binary, sets) and strings with a NUL byte or a lone surrogate (``"\\ud800"``).
    """
    problems: list[str] = []
    open_ids: set[int] = set()
    count = 0

    def walk(value: Any, path: list[str]) -> None:
        nonlocal count
        count += 1
        if count > MAX_VALUES:
            raise _TooMany
        where = ".".join(path) or "(top level)"
        if isinstance(value, (dict, list)):
            if id(value) in open_ids:
                problems.append(
                    f"{where}: contains itself (a YAML alias inside its own anchor); write it out"
                )
                return
            if len(path) >= MAX_DEPTH:
                problems.append(
                    f"{where}: nested more than {MAX_DEPTH} levels deep; no spec setting needs that"
                )
                return
            open_ids.add(id(value))
            if isinstance(value, dict):
                for key, item in value.items():
                    if isinstance(key, str):
                        walk(item, [*path, _key_text(key)])
                    else:
                        problems.append(
                            f"{where}: key {key!r} is not a string; keys must be strings (quote it)"
                        )
            else:
                for index, item in enumerate(value):
                    walk(item, [*path, str(index)])
            open_ids.discard(id(value))
        elif isinstance(value, str):
            if "\x00" in value:
                problems.append(f"{where}: contains a NUL character; remove it")
            else:
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    problems.append(
                        f"{where}: is not valid Unicode (a lone surrogate such as \\ud800); fix the text"
                    )
        elif value is not None and not isinstance(value, (bool, int, float)):
            kind = _YAML_KINDS.get(type(value).__name__, f"a {type(value).__name__}")
            problems.append(f"{where}: holds {kind}, which a spec cannot take")

    try:
        walk(data, [])
    except _TooMany:
        problems.append(
            f"(top level): holds more than {MAX_VALUES} values (counting each use of a YAML alias); "
            "a spec is never that large"
        )
    if len(problems) > limit:
        problems = problems[:limit] + [f"(top level): and {len(problems) - limit} more problems like these"]
    return problems


def _parse(text: str, suffix: str) -> Any:
    if suffix == ".json":
        return json.loads(text, object_pairs_hook=_json_unique)
    return yaml.load(text, Loader=_UniqueKeyLoader)


def read_mapping(path: str | Path, what: str = "spec") -> dict:
    """Parse a JSON or YAML file into a dict, or raise a one-line :class:`SpecError` naming the file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".json", ".yaml", ".yml"):
        raise SpecError(f"{path}: a {what} must be a .json, .yaml or .yml file (the suffix picks the parser)")
    try:
        if path.stat().st_size > MAX_SPEC_BYTES:
            raise SpecError(
                f"{path}: the {what} file is larger than {MAX_SPEC_BYTES // 2**20} MiB; is it the right file?"
            )
        raw = path.read_bytes()
    except FileNotFoundError:
        raise SpecError(f"{path}: {what} file not found; check the path") from None
    except OSError as exc:
        raise SpecError(f"{path}: cannot read the {what} file ({exc.strerror or exc})") from None
    except ValueError as exc:  # a NUL byte in the path
        raise SpecError(f"{path}: cannot read the {what} file ({exc})") from None
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark, as some Windows editors write, is fine
    except UnicodeDecodeError as exc:
        raise SpecError(
            f"{path}: the {what} file is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
            "save it as UTF-8"
        ) from None
    try:
        data = _parse(text, suffix)
    except json.JSONDecodeError as exc:
        raise SpecError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except RecursionError:
        raise SpecError(
            f"{path}: invalid {what}: nested too deeply to read; no spec setting needs that"
        ) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = exc.problem or exc.context or str(exc).splitlines()[0]
        raise SpecError(f"{path}: invalid YAML{where}: {problem}") from None
    except yaml.reader.ReaderError as exc:
        char = f"#x{exc.character:04x}" if isinstance(exc.character, int) else repr(exc.character)
        raise SpecError(
            f"{path}: invalid YAML at character {exc.position}: {char} is not allowed in YAML text"
        ) from None
    except yaml.YAMLError as exc:
        raise SpecError(
            f"{path}: invalid YAML: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from None
    except ValueError as exc:  # a duplicate JSON key, or a number too long to convert
        kind = "JSON" if suffix == ".json" else "YAML"
        message = str(exc).split("; use sys.set_int_max_str_digits", 1)[0]
        raise SpecError(f"{path}: invalid {kind}: {message}") from None
    if not isinstance(data, dict):
        got = "an empty file" if data is None else f"a {type(data).__name__}"
        raise SpecError(f"{path}: the top level of a {what} must be a mapping of keys to values, got {got}")
    problems = structure_problems(data)
    if problems:
        raise SpecError([f"{path}: {line}" for line in problems])
    return data


def load_spec(path: str | Path, world_size: int | None = None) -> RunSpec:
    """Read, validate and check a spec file; raise one :class:`SpecError` with every problem.

    Gathers schema errors, files that must exist (:func:`check_paths`) and DeepSpeed-config
    conflicts. With ``world_size`` it also checks the batch arithmetic of :func:`resolve_plan`, so a
    CLI can report every problem of a spec in one pass.
    """
    from mlkd_scale import plan as _plan  # plan imports this module

    data = read_mapping(path)
    try:
        spec = RunSpec.model_validate(data)
    except ValidationError as exc:
        # Still check the files of the sections that are valid on their own, so one pass finds all.
        problems = format_validation_error(exc) + _section_path_problems(data)
        raise SpecError(problems) from None
    problems = check_paths(spec)
    if world_size is None:
        problems += _plan.check_deepspeed(spec)
    else:
        problems += _plan.plan_problems(spec, world_size)[1]
    if problems:
        raise SpecError(problems)
    return spec


# --------------------------------------------------------------------------------------------------
# Files that must exist
# --------------------------------------------------------------------------------------------------


def _expand(name: str) -> Path:
    """``Path(name).expanduser()``, or the path as written when the home directory is unknown (``~nobody``)."""
    try:
        return Path(name).expanduser()
    except RuntimeError:
        return Path(name)


def _probe(path: Path, test: str) -> bool:
    """``path.is_dir()`` / ``is_file()`` / ``exists()``, False where the OS cannot even look.

    pathlib raises for a name too long, a permission denied on the way, a NUL byte or a lone
    surrogate; for a spec check those all mean "not usable", which the caller reports.
    """
    try:
        return getattr(path, test)()
    except (OSError, ValueError):
        return False


def looks_local(name: str) -> bool:
    """Whether a model name means a local directory rather than a hub repo id.

    ``./x``, ``/x``, ``~/x``, an existing directory, or more than one ``/`` (hub ids are ``owner/name``).
    """
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or _probe(_expand(name), "is_dir")


def find_deepspeed_config(name: str) -> Path | None:
    """Where a ``deepspeed.config`` path points: as given, else inside the repo's ``ds_configs/``."""
    if not name:
        return None
    given = _expand(name)
    if _probe(given, "is_file"):
        return given
    if not given.is_absolute():
        for candidate in (DS_CONFIG_DIR / given, DS_CONFIG_DIR / given.name):
            if _probe(candidate, "is_file"):
                return candidate
    return None


def _model_dir_problems(field: str, name: str) -> list[str]:
    if not name.strip():
        return [f"{field}: is empty; give a local Hugging Face model directory or a hub name"]
    if not looks_local(name):
        return []
    directory = _expand(name)
    if not _probe(directory, "is_dir"):
        return [
            (
                f"{field}: directory {name} does not exist; give a local Hugging Face model directory or a "
                "hub name such as 'bert-base-uncased'"
            )
        ]
    if not _probe(directory / "config.json", "is_file"):
        return [
            (
                f"{field}: {name} has no config.json; point it at a Hugging Face model directory "
                "(as written by save_pretrained)"
            )
        ]
    return []


def _source_problems(index: int, source: SourceSpec) -> list[str]:
    if source.path is None:
        return []
    field = f"data.sources.{index}.path"
    if not source.path.strip():
        return [f"{field}: is empty; give an existing file, directory or glob"]
    pattern = str(_expand(source.path))
    if glob.has_magic(pattern):
        try:
            found = any(_probe(Path(p), "is_file") for p in glob.iglob(pattern, recursive=True))
        except (OSError, ValueError):  # a NUL byte or a lone surrogate in the pattern
            found = False
        if not found:
            return [f"{field}: glob {source.path} matches no files; fix the pattern or the directory"]
        return []
    if not _probe(Path(pattern), "exists"):
        return [f"{field}: {source.path} does not exist; give an existing file, directory or glob"]
    return []


def _section_path_problems(data: dict) -> list[str]:
    """check_paths for a spec that failed validation: each section that validates alone is checked."""
    problems: list[str] = []
    sections = {
        "teacher": TeacherSpec,
        "student": StudentSpec,
        "deepspeed": DeepSpeedSpec,
        "checkpoint": CheckpointSpec,
    }
    parsed: dict[str, Any] = {}
    for key, model in sections.items():
        raw = data.get(key)
        if isinstance(raw, dict):
            try:
                parsed[key] = model.model_validate(raw)
            except ValidationError:
                pass
    if "teacher" in parsed:
        problems += _model_dir_problems("teacher.path", parsed["teacher"].path)
    if "student" in parsed and parsed["student"].path:
        problems += _model_dir_problems("student.path", parsed["student"].path)
    raw_sources = data.get("data", {}).get("sources") if isinstance(data.get("data"), dict) else None
    for i, raw in enumerate(raw_sources if isinstance(raw_sources, list) else []):
        try:
            problems += _source_problems(i, SourceSpec.model_validate(raw))
        except ValidationError:
            pass
    if isinstance(data.get("task"), dict):
        try:
            problems += _task_path_problems(TaskSpec.model_validate(data["task"]))
        except ValidationError:
            pass
    if "deepspeed" in parsed:
        problems += _deepspeed_path_problems(parsed["deepspeed"])
    if "checkpoint" in parsed:
        problems += _resume_problems(parsed["checkpoint"])
    return problems


def _task_path_problems(task: TaskSpec) -> list[str]:
    problems = []
    if task.is_squad:
        for field in ("train_file", "dev_file"):
            path = getattr(task.squad, field)
            if path is not None and not Path(path).expanduser().is_file():
                problems.append(f"task.squad.{field}: file {path} does not exist; give an official-format SQuAD JSON")
        if task.data_dir is not None and not Path(task.data_dir).expanduser().is_dir():
            problems.append(
                f"task.data_dir: directory {task.data_dir} does not exist; give the folder of the official "
                "SQuAD JSON files or leave it unset to read the hub copy"
            )
        return problems
    if task.data_dir is not None and not Path(task.data_dir).expanduser().is_dir():
        problems.append(
            f"task.data_dir: directory {task.data_dir} does not exist; give the task's folder in the original "
            f"GLUE layout (e.g. glue_data/{task.name}) or leave it unset to read the hub copy"
        )
    if task.augmented_dir is not None and not Path(task.augmented_dir).expanduser().is_dir():
        problems.append(
            f"task.augmented_dir: directory {task.augmented_dir} does not exist; give the --out directory of a "
            "finished launchers/augment.py run or leave it unset"
        )
    return problems


def _deepspeed_path_problems(ds: DeepSpeedSpec) -> list[str]:
    if isinstance(ds.config, str) and find_deepspeed_config(ds.config) is None:
        if not ds.config.strip():
            return [
                "deepspeed.config: is empty; give a DeepSpeed JSON file (e.g. zero2.json) or leave it unset"
            ]
        return [
            (
                f"deepspeed.config: file {ds.config} not found (looked at {ds.config} and in "
                f"{DS_CONFIG_DIR}); give an existing DeepSpeed JSON file, e.g. ds_configs/zero2.json"
            )
        ]
    return []


def _resume_problems(ckpt: CheckpointSpec) -> list[str]:
    if ckpt.resume in ("auto", "never") or (ckpt.resume.strip() and _probe(_expand(ckpt.resume), "is_dir")):
        return []
    return [
        (
            f"checkpoint.resume: {ckpt.resume} is not a directory; use 'auto', 'never' or an existing "
            "checkpoint tag directory"
        )
    ]


def check_paths(spec: RunSpec) -> list[str]:
    """Problems with files the run needs before it starts (data, teacher/student dirs, DeepSpeed file).

    Checked up front so a cluster job does not fail minutes in, after the launcher started every rank.
    Hub names are not checked (that would need the network).
    """
    problems = _model_dir_problems("teacher.path", spec.teacher.path)
    if spec.student.path:
        problems += _model_dir_problems("student.path", spec.student.path)
    for i, source in enumerate(spec.data.sources if spec.data is not None else []):
        problems += _source_problems(i, source)
    if spec.task is not None:
        problems += _task_path_problems(spec.task)
    problems += _deepspeed_path_problems(spec.deepspeed)
    problems += _resume_problems(spec.checkpoint)
    return problems


# --------------------------------------------------------------------------------------------------
# Identity
# --------------------------------------------------------------------------------------------------

#: Keys left out of :func:`spec_hash`: they say where outputs go, how often to log/checkpoint and where
#: to resume from, so changing them on resume is expected and must not look like a changed run.
HASH_EXCLUDE: dict[str, Any] = {"run": {"name", "output_dir"}, "checkpoint": True, "logging": True}


def spec_hash(spec: RunSpec) -> str:
    """A short, stable id of everything that shapes the training math (16 hex digits of sha256).

    Stored in checkpoints: a resumed run compares it to detect a changed spec. It is the sha256 of
    the canonical JSON dump (sorted keys, no whitespace) minus :data:`HASH_EXCLUDE`.
    """
    dump = spec.model_dump(mode="json", exclude=HASH_EXCLUDE)
    canonical = json.dumps(dump, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def __getattr__(name: str) -> Any:
    # Plan / resolve_plan live in mlkd_scale.plan (which imports this module); re-exported lazily
    # so `from mlkd_scale.spec import resolve_plan` works without an import cycle.
    if name in ("Plan", "resolve_plan"):
        from mlkd_scale import plan as _plan

        return getattr(_plan, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
