"""The run spec: every knob of a distillation run, validated by Pydantic v2.

Each UNKNOWN of the MLKD-BERT paper (see ``shared/paper/mlkd-bert-method.md`` §9) is a field here
with the documented default, so a user can switch readings without code changes.
Unknown keys are rejected everywhere (``extra="forbid"``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class StrictModel(BaseModel):
    """Base for every spec section: unknown keys are errors, values are re-validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


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
            raise ValueError(
                f"student.num_heads ({self.num_heads}) must divide student.hidden_size "
                f"({self.hidden_size}); pick a head count such as "
                f"{[h for h in range(1, 25) if self.hidden_size % h == 0][-4:]}"
            )
        if self.init == "path" and not self.path:
            raise ValueError("student.init is 'path' but student.path is not set; give the student's directory")
        if self.path and self.init != "path":
            raise ValueError("student.path is set but student.init is not 'path'; set init to 'path' or drop path")
        return self


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
        "per_layer", description="W_h for L_FFN: one student->teacher projection per mapped layer, or one shared."
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
            raise ValueError("each data source needs exactly one of 'name' (hub dataset) or 'path' (local files)")
        return self


class DataSpec(StrictModel):
    """The streamed corpus: sources, interleave, packing into full sequences."""

    sources: list[SourceSpec] = Field(min_length=1, description="Text sources, interleaved by weight.")
    max_seq_length: int = Field(128, ge=8, description="Tokens per packed sequence, [CLS] and [SEP] included.")
    shuffle_buffer: int = Field(
        1000, ge=0, description="Documents held in the shuffle buffer (saved in checkpoints); 0 = no shuffle."
    )


class CheckpointSpec(StrictModel):
    """Sharded DeepSpeed checkpoints of the student and the exact data position."""

    every_n_steps: int = Field(1000, ge=1, description="Write a checkpoint every N optimizer steps (and at the end).")
    keep_last: int = Field(3, ge=1, description="Keep the newest K complete checkpoints, delete older ones.")
    resume: str = Field(
        "auto",
        description="'auto': continue from the newest complete checkpoint in the run's checkpoint dir if any; "
        "'never': start fresh (an existing checkpoint dir is an error); or a path to a checkpoint tag dir.",
    )
    dir: str | None = Field(None, description="Checkpoint directory; default <run.output_dir>/checkpoints.")
    export_at_end: bool = Field(True, description="Write the student as a Hugging Face directory at the end.")


class LoggingSpec(StrictModel):
    """TensorBoard and console logging, rank 0 only."""

    every_n_steps: int = Field(10, ge=1, description="Log scalars every N optimizer steps.")
    tensorboard_dir: str | None = Field(None, description="Event file directory; default <run.output_dir>/tensorboard.")
    progress_bar: bool = Field(True, description="Show a progress bar on rank 0.")
