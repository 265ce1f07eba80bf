"""TinyBERT-style augmentation of task data: inputs, word neighbours, the augmenter and its resumable cache."""
