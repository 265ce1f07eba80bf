"""User-facing error types that several layers raise (the spec's own is mlkd_scale.spec.SpecError)."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, damaged, untrusted or does not fit this run; the message says what to do."""
