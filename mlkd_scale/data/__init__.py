"""Data: the streamed general-distillation corpus (and, later, task datasets).

* :mod:`~mlkd_scale.data.sources`: open hub/local text sources as ``datasets`` streams, interleave by
  weight, split across ranks.
* :mod:`~mlkd_scale.data.shuffle`: a document shuffle buffer whose state is saved in checkpoints.
* :mod:`~mlkd_scale.data.packing`: tokenize and pack documents into full ``[CLS] ... [SEP]`` sequences.
* :mod:`~mlkd_scale.data.stream`: :class:`PackedStream`, the exactly-resumable stream the engine uses.
* :mod:`~mlkd_scale.data.local_corpus`: a no-download English corpus from stdlib docstrings.

Submodules are imported on demand, so that light modules do not pay for importing ``datasets``.
"""
