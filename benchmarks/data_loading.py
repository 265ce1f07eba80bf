"""Input rate of the two data paths, side by side: streamed (tokenized while training) and pretokenized.

A training step can only be as fast as its batches arrive. This prints how many tokens per second
one rank's stream delivers on this machine, for the corpus of a run spec:

* ``streamed``     ``PackedStream``: datasets streaming, shuffle buffer, tokenizing and packing in the
                   training process (what a spec without ``data.pretokenized_dir`` does);
* ``pretokenized`` ``PretokenizedStream`` over a directory written by ``mlkd-scale pretokenize``
                   (written first into a temporary directory, its time reported too).

    .venv/bin/python benchmarks/data_loading.py --spec examples/quickstart.json
    .venv/bin/python benchmarks/data_loading.py --spec run.yaml --batch 64 --seconds 20 --workers 8

The two are timed in alternating slices (``--rounds``) so a busy spell of the machine hits both.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import format_table
from transformers import AutoTokenizer

from mlkd_scale.data.corpus.pretokenized import PretokenizedStream, write_pretokenized
from mlkd_scale.data.corpus.stream import PackedStream
from mlkd_scale.spec import load_spec


def tokens_per_second(stream, batch: int, seconds: float) -> tuple[float, int]:
    """Batches drawn for ``seconds``; (tokens/s, tokens)."""
    start, tokens = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        tokens += stream.next_batch(batch)["input_ids"].numel()
    return tokens / (time.perf_counter() - start), tokens


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", required=True, help="a general-distillation run spec (its data and teacher)")
    parser.add_argument("--batch", type=int, default=64, help="sequences per next_batch call")
    parser.add_argument("--seconds", type=float, default=5.0, help="time per slice")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="pretokenize worker processes")
    args = parser.parse_args(argv)

    spec = load_spec(args.spec)
    data = spec.data.model_copy(update={"pretokenized_dir": None})
    tokenizer = AutoTokenizer.from_pretrained(spec.teacher.path)
    with tempfile.TemporaryDirectory(prefix="pretok-") as tmp:
        meta = write_pretokenized(data, spec.teacher.path, Path(tmp) / "pt", spec.run.seed, args.workers)
        streams = {
            "streamed": PackedStream(data, tokenizer, 0, 1, spec.run.seed),
            "pretokenized": PretokenizedStream(
                data.model_copy(update={"pretokenized_dir": str(Path(tmp) / "pt")}), tokenizer, 0, 1, spec.run.seed
            ),
        }
        rates: dict[str, list[float]] = {name: [] for name in streams}
        for stream in streams.values():
            stream.next_batch(args.batch)  # open files, fill the shuffle buffer
        for _ in range(args.rounds):
            for name, stream in streams.items():
                rates[name].append(tokens_per_second(stream, args.batch, args.seconds)[0])
    best = {name: max(values) for name, values in rates.items()}
    rows = [
        [name, f"{best[name]:,.0f}", f"{best[name] / args.batch / data.max_seq_length:,.1f}",
         f"{best[name] / best['streamed']:,.1f}"]
        for name in streams
    ]
    print(
        f"corpus {', '.join(meta['sources'])}: {meta['num_sequences']:,} sequences of {data.max_seq_length} "
        f"tokens; pretokenize took {meta['seconds']} s with {args.workers} worker processes"
    )
    print(f"batch {args.batch}, {args.rounds} alternating slices of {args.seconds:g} s each, best slice per path")
    print(format_table(["path", "tokens/s", "batches/s", "÷ streamed"], rows))


if __name__ == "__main__":
    main()
