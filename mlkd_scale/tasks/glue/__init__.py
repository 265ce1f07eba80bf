"""GLUE: the task table, the original TSV files and the hub copy, the official metrics."""
