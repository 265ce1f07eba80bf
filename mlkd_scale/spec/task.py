"""The ``task`` section: task distillation and teacher fine-tuning on GLUE or SQuAD, with per-stage budgets."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    Field,
    field_validator,
    model_validator,
)

from mlkd_scale.spec.fields import StrictModel
from mlkd_scale.tasks.names import canonical_task_name, is_squad_name

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
        "data; Stage 2 uses it too when augment_stage2 is set; teacher fine-tuning always uses the original "
        "train split.",
    )
    augment_stage2: bool = Field(
        False,
        description="Train Stage 2 on the augmentation cache too, as TinyBERT's prediction-layer distillation "
        "does (its task_distill.py --aug_train in both steps). Needs augmented_dir.",
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
        return canonical_task_name(value)  # 'squad_v1', 'squad_v2' or GLUE's own spelling

    @property
    def is_squad(self) -> bool:
        return self.name.startswith("squad_")

    @model_validator(mode="before")
    @classmethod
    def _squad_defaults(cls, data: Any) -> Any:
        """SQuAD runs get a squad section with its defaults and windows of 384 tokens unless set."""
        if isinstance(data, dict) and isinstance(data.get("name"), str) and is_squad_name(data["name"]):
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

    @model_validator(mode="after")
    def _augment_stage2_needs_a_cache(self) -> TaskSpec:
        if self.augment_stage2 and self.augmented_dir is None:
            raise ValueError("augment_stage2: needs augmented_dir (the cache Stage 2 would train on); set it or unset this")
        return self

    @field_validator("stages")
    @classmethod
    def _ordered_stages(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value) or value != sorted(value):
            raise ValueError(f"list each stage once, in order: [1, 2], [1] or [2]; got {value}")
        return value
