"""The general-distillation corpus: sources, streaming, packing, pretokenized corpora, held-out documents, MLM masking.

* :mod:`~mlkd_scale.data.corpus.sources`: open hub/local text sources as ``datasets`` streams, interleave by
  weight, split across ranks.
* :mod:`~mlkd_scale.data.corpus.shuffle`: a document shuffle buffer whose state is saved in checkpoints.
* :mod:`~mlkd_scale.data.corpus.packing`: tokenize and pack documents into full ``[CLS] ... [SEP]`` sequences.
* :mod:`~mlkd_scale.data.corpus.stream`: :class:`PackedStream`, one exactly-resumable stream (a rank's, or a shard's).
* :mod:`~mlkd_scale.data.corpus.stream_shards`: :class:`ShardedStream`, what the engine reads: world-size
  independent stream shards, so a run resumes at another world size.
* :mod:`~mlkd_scale.data.corpus.local_corpus`: a no-download English corpus from stdlib docstrings.

Submodules are imported on demand, so that light modules do not pay for importing ``datasets``.
"""
