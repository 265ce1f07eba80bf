"""``RunSpec``: the whole spec, and the rules that tie its sections together."""

from __future__ import annotations

from pydantic import (
    Field,
    model_validator,
)

from mlkd_scale.spec.fields import StrictModel
from mlkd_scale.spec.sections import (
    CheckpointSpec,
    DataSpec,
    DeepSpeedSpec,
    EvalSpec,
    FaultsSpec,
    LoggingSpec,
    LossesSpec,
    RunInfo,
    StudentSpec,
    TeacherSpec,
    TrainSpec,
)
from mlkd_scale.spec.task import TaskSpec


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
    eval: EvalSpec = Field(
        default_factory=EvalSpec, description="Evaluation on held-out documents during general distillation."
    )
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
    if spec.task is None and spec.eval.every_n_steps is not None and not spec.data.heldout_fraction:
        return ["eval.every_n_steps: evaluation needs held-out documents; set data.heldout_fraction (e.g. 0.01)"]
    if spec.task is None and spec.data.heldout_fraction and spec.data.pretokenized_dir:
        return ["data.heldout_fraction: holding documents out needs a streamed corpus; unset data.pretokenized_dir"]
    if spec.task is not None and spec.eval.every_n_steps is not None:
        return ["eval.every_n_steps: a task run evaluates on dev (task.eval_every_n_steps); remove the eval section"]
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
