"""Data: the streamed general-distillation corpus (and, later, task datasets).

* :mod:`~mlkd_scale.data.sources`: open hub/local text sources as ``datasets`` streams, interleave by
  weight, split across ranks.
* :mod:`~mlkd_scale.data.shuffle`: a document shuffle buffer whose state is saved in checkpoints.
* :mod:`~mlkd_scale.data.packing`: tokenize and pack documents into full ``[CLS] ... [SEP]`` sequences.
* :mod:`~mlkd_scale.data.stream`: :class:`PackedStream`, one exactly-resumable stream (a rank's, or a shard's).
* :mod:`~mlkd_scale.data.stream_shards`: :class:`ShardedStream`, what the engine reads: world-size
  independent stream shards, so a run resumes at another world size.
* :mod:`~mlkd_scale.data.local_corpus`: a no-download English corpus from stdlib docstrings.

Submodules are imported on demand, so that light modules do not pay for importing ``datasets``.
"""
