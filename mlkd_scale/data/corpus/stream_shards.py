"""Stream shards: a split of the corpus that does not depend on the world size.

A run's corpus is split into a fixed number ``V`` of *stream shards* (``data.stream_shards``; unset =
the world size of the first launch, then fixed: it is recorded in every checkpoint). Shard ``v`` is
exactly the per-rank pipeline of :class:`~mlkd_scale.data.corpus.stream.PackedStream` with
``(rank=v, world_size=V)``: its own slice of the sources, its own shuffle buffer (seed
``[seed, v]``), its own packer. Rank ``r`` of ``W`` owns the shards ``{v : v % W == r}`` and takes
its micro batches from them in turn (micro batch ``i`` from its ``(cursor + i) % len(shards)``-th
shard). Each shard yields the same samples in the same order whichever rank reads it, so a
checkpoint holds one position per *shard*, and a run resumed at another world size hands each
shard's position to its new owner: no document is lost or repeated.

With ``V == W`` (the default) every rank owns one shard, its own ``PackedStream(rank, W)``: the
samples, their order and the cost are those of a run without shards.

Why whole micro batches in turn, not samples: a micro batch stays ``B`` consecutive samples of one
shard, as at ``V`` ranks, so when the gradient accumulation is scaled with the world size
(``accumulation x W`` constant, and a multiple of the shards a rank owns) every optimizer step
takes the same samples from every shard as the ``V``-rank run does, step for step.

Bound: at most ``V`` ranks (a rank without a shard would have no data). Set ``data.stream_shards``
at the start to the largest world size a run may resume at; it must be a multiple of every world
size used for the micro batches per shard to stay even.
"""

from __future__ import annotations

from collections.abc import Mapping

from mlkd_scale.data.corpus.packing import collate
from mlkd_scale.data.corpus.sources import DataError
from mlkd_scale.data.corpus.stream import COUNTERS, PackedStream
from mlkd_scale.spec import DataSpec

STATE_KIND = "stream_shards"
STATE_VERSION = 1


def owned_shards(rank: int, world_size: int, num_shards: int) -> list[int]:
    """The stream shards rank ``rank`` of ``world_size`` reads: ``{v : v % world_size == rank}``."""
    check_world_size(world_size, num_shards)
    return list(range(rank, num_shards, world_size))


def check_world_size(world_size: int, num_shards: int) -> None:
    """A DataError when ``world_size`` ranks cannot share ``num_shards`` shards (a rank would get none)."""
    if world_size > num_shards:
        raise DataError(
            f"this run has {world_size} ranks but its data is split into {num_shards} stream shards "
            f"(data.stream_shards, fixed at the run's first launch), so a rank would get no data; "
            f"resume with at most {num_shards} ranks, or start a run with data.stream_shards set to "
            "the largest world size it may resume at"
        )


def shard_states(data_state: dict) -> tuple[int, dict[int, dict]]:
    """``(num_shards, {shard: PackedStream state})`` of one rank's saved data state.

    A :class:`PackedStream` state (checkpoints written before stream shards existed) reads as the
    one shard ``rank`` of ``world_size`` shards, which is what it is.
    """
    if data_state.get("kind") == STATE_KIND:
        if data_state.get("version") != STATE_VERSION:
            raise DataError(
                f"stream-shard state has version {data_state.get('version')}, this code reads {STATE_VERSION}"
            )
        return data_state["num_shards"], {int(v): s for v, s in data_state["shards"].items()}
    return data_state["world_size"], {data_state["rank"]: data_state}


def regroup(old: Mapping[int, dict], rank: int, world_size: int) -> dict:
    """The data state of rank ``rank`` of ``world_size``, assembled from the saved data states ``old``
    (old rank -> its state; any subset that holds this rank's shards, e.g. of another world size).

    The result loads into :meth:`ShardedStream.load_state_dict`. The cursor (which owned shard the
    next micro batch comes from) carries over only when the rank owns the same shards as before;
    otherwise the rank starts at its first shard.
    """
    sizes, shards = set(), {}
    for old_rank, state in old.items():
        num_shards, states = shard_states(state)
        sizes.add(num_shards)
        for v, shard_state in states.items():
            if v in shards:
                raise DataError(
                    f"stream shard {v} is saved twice (again by rank {old_rank}); the checkpoint is damaged"
                )
            shards[v] = shard_state
    if len(sizes) != 1:
        raise DataError(
            f"the saved data states disagree on the number of stream shards ({sorted(sizes)}); "
            "the checkpoint is damaged"
        )
    num_shards = sizes.pop()
    mine = owned_shards(rank, world_size, num_shards)
    missing = [v for v in mine if v not in shards]
    if missing:
        raise DataError(f"the saved data states lack stream shards {missing} that rank {rank} needs")
    same = old.get(rank)
    cursor = 0
    if same is not None and same.get("kind") == STATE_KIND and sorted(shard_states(same)[1]) == mine:
        cursor = same["cursor"]
    return {
        "kind": STATE_KIND,
        "version": STATE_VERSION,
        "num_shards": num_shards,
        "rank": rank,
        "world_size": world_size,
        "cursor": cursor,
        "shards": {v: shards[v] for v in mine},
    }


class ShardedStream:
    """This rank's packed micro batches, read in turn from the stream shards it owns.

    The interface the trainer uses: :meth:`next_batch` (adds ``shard``: the shard it came from),
    :meth:`stats`, :meth:`state_dict`, :meth:`load_state_dict`.
    """

    def __init__(
        self, data_spec: DataSpec, tokenizer, rank: int, world_size: int, seed: int, num_shards: int
    ):
        self.rank, self.world_size, self.num_shards = rank, world_size, num_shards
        self.shards = owned_shards(rank, world_size, num_shards)
        self.streams = {v: PackedStream(data_spec, tokenizer, v, num_shards, seed) for v in self.shards}
        self.cursor = 0

    def next_batch(self, batch_size: int) -> dict:
        """``batch_size`` consecutive samples of the next shard in turn (see :meth:`PackedStream.next_batch`)."""
        shard = self.shards[self.cursor]
        self.cursor = (self.cursor + 1) % len(self.shards)
        batch = collate([self.streams[shard].next_sample() for _ in range(batch_size)])
        batch["shard"] = shard
        return batch

    def stats(self) -> dict:
        """Counters summed over the owned shards; ``epoch`` is their mean epoch."""
        per_shard = [s.stats() for s in self.streams.values()]
        totals = {k: sum(s[k] for s in per_shard) for k in (*COUNTERS, "tokens")}
        return {"epoch": sum(s["epoch"] for s in per_shard) / len(per_shard), **totals}

    def state_dict(self) -> dict:
        """One :class:`PackedStream` state per owned shard, and the cursor."""
        return {
            "kind": STATE_KIND,
            "version": STATE_VERSION,
            "num_shards": self.num_shards,
            "rank": self.rank,
            "world_size": self.world_size,
            "cursor": self.cursor,
            "shards": {v: stream.state_dict() for v, stream in self.streams.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``: this rank's own, or one made by :func:`regroup` for it."""
        num_shards, states = shard_states(state)
        if num_shards != self.num_shards:
            raise DataError(
                f"the data state is split into {num_shards} stream shards but this run into {self.num_shards}; "
                "data.stream_shards is fixed at a run's first launch: leave it unset or set it to "
                f"{num_shards}"
            )
        if sorted(states) != self.shards:
            raise DataError(
                f"the data state holds stream shards {sorted(states)} but rank {self.rank} of "
                f"{self.world_size} reads {self.shards}; load each rank's own state (or regroup them)"
            )
        for v, shard_state in states.items():
            self.streams[v].load_state_dict(shard_state)
        self.cursor = state.get("cursor", 0) % len(self.shards)
