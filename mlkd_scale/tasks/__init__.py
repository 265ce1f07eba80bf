"""Task types behind one protocol and registry: GLUE and SQuAD (readers, features, metrics)."""
