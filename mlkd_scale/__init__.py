"""mlkd_scale: multi-level knowledge distillation of BERT-like encoders on DeepSpeed."""

__version__ = "0.1.0"
