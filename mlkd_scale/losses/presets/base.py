"""What a loss preset is: its terms per stage, tap requests, projections, checks and term computations.

A preset is a class registered under its name with :func:`register_preset`; the objective
(:class:`~mlkd_scale.losses.objective.DistillationObjective`) builds one per stage from a
:class:`PresetSetup`, asks it which features each model must expose and how many projections it
trains, then weights and sums the terms it computes. Every term ``x`` is a method ``term_x``
taking :class:`TermInputs` and returning an unweighted fp32 scalar.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from transformers import PretrainedConfig

from mlkd_scale.losses.prediction import prediction_kd_loss, prediction_mse_loss
from mlkd_scale.models.taps import Features, TapRequest
from mlkd_scale.spec import LossesSpec
from mlkd_scale.spec.presets import add_preset_name

_NONE: frozenset[int] = frozenset()


@dataclass(frozen=True)
class PresetSetup:
    """Everything a preset may read about one stage: the spec's losses section, the stage, the task
    kind, the layer mapping (``layer_map[n-1]`` = teacher layer of student layer n) and both configs."""

    spec: LossesSpec
    stage: int
    regression: bool
    qa: bool
    layer_map: list[int]
    teacher: PretrainedConfig
    student: PretrainedConfig

    @property
    def d_teacher(self) -> int:
        return self.teacher.hidden_size

    @property
    def d_student(self) -> int:
        return self.student.hidden_size

    @property
    def num_student_layers(self) -> int:
        return self.student.num_hidden_layers

    @property
    def pairs(self) -> list[tuple[int, int]]:
        """(student layer n, teacher layer m = g(n)) for every student layer."""
        return list(enumerate(self.layer_map, start=1))

    @property
    def num_splits(self) -> int:
        """A_s of L_MHA: ``losses.mha_splits``, else the student's head count."""
        return self.spec.mha_splits or self.student.num_attention_heads


@dataclass
class TermInputs:
    """One forward's inputs to the terms. ``project(i, x)`` applies projection i (the shared one
    when there is one); ``attention_mask`` [B, L] is the batch's, whatever ``losses.mask_padding``."""

    teacher: Features
    student: Features
    attention_mask: torch.Tensor | None
    labels: torch.Tensor | None
    project: Callable[[int, torch.Tensor], torch.Tensor]


class Preset:
    """Base of every preset; subclasses set the class attributes and define ``term_<name>`` methods."""

    name: ClassVar[str]
    #: Term names per stage (1, 2); every name a spec's ``losses.weights`` may use.
    terms: ClassVar[dict[int, tuple[str, ...]]]
    #: Terms that need class labels: off for question answering, and for regression unless
    #: :meth:`label_terms_for_regression` keeps them.
    label_terms: ClassVar[frozenset[str]] = frozenset()
    #: Long names of terms, for messages (``sc`` -> ``sample-contrastive``).
    titles: ClassVar[dict[str, str]] = {}
    #: Terms (per stage) that read masked-LM logits [B, L, V] and labels [B, L].
    masked_lm_terms: ClassVar[dict[int, frozenset[str]]] = {}
    #: Weights of terms the spec does not name, per stage (a term missing here weighs 1.0).
    default_weights: ClassVar[dict[int, dict[str, float]]] = {}
    default_kd_temperature: ClassVar[float] = 1.0
    default_projection: ClassVar[str] = "per_layer"
    #: The ``losses`` fields this preset reads (documentation, and checked to exist by the tests).
    reads: ClassVar[tuple[str, ...]] = ("weights", "layer_mapping")

    def __init__(self, setup: PresetSetup):
        self.setup = setup
        self.spec = setup.spec

    @classmethod
    def all_terms(cls) -> set[str]:
        return {t for names in cls.terms.values() for t in names}

    def stage_terms(self) -> tuple[str, ...]:
        """This stage's terms before weighting (a preset may choose them from the spec)."""
        return self.terms[self.setup.stage]

    def label_terms_for_regression(self) -> bool:
        return False

    def default_weight(self, term: str) -> float:
        return self.default_weights.get(self.setup.stage, {}).get(term, 1.0)

    @property
    def kd_temperature(self) -> float:
        t = self.spec.kd_temperature
        return self.default_kd_temperature if t is None else t

    @property
    def projection(self) -> str:
        return self.spec.projection or self.default_projection

    # ---- what a preset declares; the defaults fit a preset without projections -----------------

    def check_shapes(self, weights: dict[str, float]) -> None:
        """Raise ValueError (naming the spec field) when the models' shapes cannot run the terms."""

    def num_projections(self) -> int:
        return 0

    def used_projections(self, weights: dict[str, float], count: int) -> set[int]:
        """Indices of the projections this stage trains (the others stay, frozen)."""
        return set()

    def request(self, weights: dict[str, float], teacher: bool) -> TapRequest:
        raise NotImplementedError(f"the {self.name} preset does not say what its taps record")

    def term(self, name: str, inputs: TermInputs) -> torch.Tensor:
        return getattr(self, f"term_{name}")(inputs)

    # ---- helpers shared by the presets ---------------------------------------------------------

    def mapped_layers(self, teacher: bool) -> frozenset[int]:
        """The teacher's mapped layers, or all the student's."""
        return frozenset(self.setup.layer_map) if teacher else frozenset(range(1, self.setup.num_student_layers + 1))

    def last_layer(self, teacher: bool) -> int:
        return self.setup.layer_map[-1] if teacher else self.setup.num_student_layers

    def soft_label_kd(self, t_logits: torch.Tensor, s_logits: torch.Tensor) -> torch.Tensor:
        """L_KD = τ² · KL(softmax(z^T/τ) ‖ softmax(z^S/τ)) (the τ² unless ``kd_scale_by_t2`` is off),
        or the MSE between the outputs for regression (:mod:`mlkd_scale.losses.prediction`)."""
        if self.setup.regression:
            return prediction_mse_loss(t_logits, s_logits)
        tau = self.kd_temperature
        scale = 1.0 if self.spec.kd_scale_by_t2 else tau**-2
        return prediction_kd_loss(t_logits, s_logits, tau) * scale

    @staticmethod
    def need_labels(labels: torch.Tensor | None, term: str, what: str = "the batch's labels") -> torch.Tensor:
        if labels is None:
            raise ValueError(f"the {term} term needs {what}, and none were passed to the objective")
        return labels


#: name -> preset class; filled by :func:`register_preset` (the built-ins in ``presets/__init__``).
PRESETS: dict[str, type[Preset]] = {}


def register_preset(cls: type[Preset]) -> type[Preset]:
    """Class decorator: make ``cls`` the preset named ``cls.name`` (and a valid ``losses.preset``)."""
    PRESETS[cls.name] = cls
    add_preset_name(cls.name)
    return cls


def get_preset(name: str) -> type[Preset]:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"losses.preset: unknown preset {name!r}; the known presets are: {', '.join(sorted(PRESETS))}") from None
