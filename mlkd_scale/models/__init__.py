"""Teacher loading, student building, layer mapping and feature taps."""

from mlkd_scale.models.mapping import resolve_layer_mapping
from mlkd_scale.models.student import build_student, build_student_config, resolve_init_layers
from mlkd_scale.models.taps import Features, FeatureTap, TapRequest
from mlkd_scale.models.teacher import check_model_fit, load_teacher

__all__ = [
    "FeatureTap",
    "Features",
    "TapRequest",
    "build_student",
    "build_student_config",
    "check_model_fit",
    "load_teacher",
    "resolve_init_layers",
    "resolve_layer_mapping",
]
