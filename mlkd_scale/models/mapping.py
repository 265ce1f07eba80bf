"""Which teacher layer each student layer learns from."""

from __future__ import annotations


def resolve_layer_mapping(mapping: str | list[int], num_student_layers: int, num_teacher_layers: int) -> list[int]:
    """Return ``g`` as a list: ``g[n-1]`` is the teacher layer (1-based) for student layer ``n``.

    ``"uniform"`` is TinyBERT's mapping used by MLKD-BERT: g(n) = floor(n·M/N), so a 4-layer student of
    a 12-layer teacher learns from layers 3, 6, 9, 12 and the last student layer always maps to the
    last teacher layer. An explicit list must have one entry per student layer, each in 1..M.
    The embedding layer always maps to the embedding layer (g(0) = 0) and is not part of the list.
    """
    n, m = num_student_layers, num_teacher_layers
    if mapping == "uniform":
        if n > m:
            raise ValueError(
                f"losses.layer_mapping 'uniform' needs a student with at most as many layers as the teacher "
                f"({n} > {m}); give an explicit list of {n} teacher layers"
            )
        return [k * m // n for k in range(1, n + 1)]
    if isinstance(mapping, str):
        message = f"losses.layer_mapping must be 'uniform' or a list of teacher layers, not {mapping!r}"
        raise ValueError(message)  # noqa: TRY004 - a bad spec value, reported like every other one
    layers = list(mapping)
    if len(layers) != n:
        raise ValueError(
            f"losses.layer_mapping has {len(layers)} entries but the student has {n} layers; give one teacher "
            "layer per student layer"
        )
    bad = [t for t in layers if not isinstance(t, int) or not 1 <= t <= m]
    if bad:
        raise ValueError(f"losses.layer_mapping entries {bad} are outside the teacher's layers 1..{m}")
    return layers
