"""SQuAD v1.1 / v2.0: examples, doc-stride features, post-processing, official EM/F1, the task."""
