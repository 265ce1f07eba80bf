"""Task runs: teacher fine-tuning and task distillation (Stage 1, Stage 2), their stages, the teacher cache."""
