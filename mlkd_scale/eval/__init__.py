"""Evaluation: dev metrics during task stages, held-out scores during general distillation, agreement with the teacher."""
