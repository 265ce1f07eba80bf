"""mlkd_scale: multi-level knowledge distillation of BERT-like encoders on DeepSpeed."""

from mlkd_scale.lazy_imports import defer_optional_imports

__version__ = "0.1.0"

defer_optional_imports()  # before anything imports deepspeed (whose autotuner imports mlflow)
