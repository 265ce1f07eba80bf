"""Checkpoints: the manager (save, verify, resume, keep-last, best), manifests, safe loading, RNG state, resharding."""
