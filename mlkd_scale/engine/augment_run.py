"""TinyBERT-style augmentation of a task's train file, on every rank of a launch: the body of
``launchers/augment.py``.

Runs as plain ``python`` (one process) or under ``deepspeed``/``torchrun`` (each rank its shard;
CPU ranks need ``DS_ACCELERATOR=cpu``), joined like every other run
(:func:`~mlkd_scale.engine.distributed.init_distributed`). Rerun the same command to resume an
interrupted run; read the result with ``mlkd_scale.data.augment.augmenter.load_augmented(OUT)``.

Under the ``deepspeed`` launcher write ``--num_variants`` instead of ``--n``: the launcher's own
argument parser sees every argument and stops on ``--n`` (an abbreviation of several of its options).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer

from mlkd_scale.data.augment.augmenter import Augmenter, EmbeddingNeighbours, GloveNeighbours, augment_dataset
from mlkd_scale.data.augment.inputs import file_sha256, read_examples
from mlkd_scale.engine.distributed import init_distributed
from mlkd_scale.errors import AugmentCacheError, AugmentInputError
from mlkd_scale.tasks.glue.table import TASKS, get_task

#: Ranks of a large augmentation may finish hours apart: their final barrier waits this long.
AUGMENT_TIMEOUT_S = 2 * 24 * 3600


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line of ``launchers/augment.py``; ``--task`` fills the GLUE task's columns and n."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--teacher_mlm", required=True, help="Hugging Face dir of a masked LM (e.g. BERT-base)")
    parser.add_argument("--input", required=True, help="training examples: .jsonl, or .tsv with a header")
    parser.add_argument("--out", required=True, help="cache directory (shards, settings.json, DONE)")
    parser.add_argument("--task", choices=sorted(t.name.lower() for t in TASKS.values() if t.augment), type=str.lower,
                        help="GLUE task: sets the fields and TinyBERT's n for it (explicit flags win)")
    parser.add_argument("--n", "--num_variants", dest="n", type=int, default=None,
                        help="variants per sentence (default 20, or the task's); under deepspeed spell it "
                             "--num_variants: deepspeed's own parser rejects --n as an ambiguous abbreviation")
    parser.add_argument("--p", type=float, default=0.4, help="probability of replacing an eligible word")
    parser.add_argument("--k", type=int, default=15, help="candidates per word (TinyBERT's M)")
    parser.add_argument("--glove", default=None, help="GloVe .txt for multi-piece words (default: MLM embeddings)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--max_seq_length", type=int, default=None, help="masked-LM input cap (default 512)")
    parser.add_argument("--dedup", action="store_true", help="drop variants equal to an earlier one (TinyBERT)")
    parser.add_argument("--batch_size", type=int, default=32, help="masked rows per forward")
    parser.add_argument("--commit_every", type=int, default=16, help="examples between progress commits")
    parser.add_argument("--text_a_field", default=None)
    parser.add_argument("--text_b_field", default=None)
    parser.add_argument("--label_field", default=None)
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by deepspeed
    args = parser.parse_args(argv)
    preset = get_task(args.task).augment if args.task else None
    args.columns = preset.columns if preset else None
    args.n = args.n if args.n is not None else (preset.n if preset else 20)
    args.text_a_field = args.text_a_field or (preset.text_a if preset else "text_a")
    args.text_b_field = args.text_b_field or (preset.text_b if preset else None)
    args.label_field = args.label_field or (preset.label if preset else None)
    return args


def _load_mlm(path: str, device: torch.device, verbose: bool):
    model, info = AutoModelForMaskedLM.from_pretrained(path, output_loading_info=True)
    missing = sorted(info.get("missing_keys", []))
    if missing and verbose:
        print(f"warning: {path} has no trained masked-LM head ({len(missing)} weights newly initialised, "
              f"e.g. {missing[0]}); candidates will be noise", file=sys.stderr)
    return model.to(device).eval()


def main(argv: list[str] | None = None) -> int:
    """Augment ``--input`` into ``--out`` on every rank of the launch (each its shard); 0, or 2 with one
    message for bad input."""
    args = parse_args(argv)
    dist = init_distributed(timeout_s=AUGMENT_TIMEOUT_S)
    rank, world_size, device = dist.rank, dist.world_size, dist.device
    teacher = str(Path(args.teacher_mlm).resolve())
    try:
        examples = read_examples(args.input, args.text_a_field, args.text_b_field, args.label_field, args.columns)
        tokenizer = AutoTokenizer.from_pretrained(teacher)
        model = _load_mlm(teacher, device, verbose=rank == 0)
        neighbours = GloveNeighbours(args.glove) if args.glove else EmbeddingNeighbours(model, tokenizer)
        augmenter = Augmenter(model, tokenizer, neighbours, p=args.p, k=args.k, n=args.n, seed=args.seed,
                              max_seq_length=args.max_seq_length, dedup=args.dedup, batch_size=args.batch_size)
        meta = {"input": str(Path(args.input).resolve()), "input_sha256": file_sha256(args.input),
                "fields": [args.text_a_field, args.text_b_field, args.label_field]}
        totals = augment_dataset(examples, args.out, augmenter, rank, world_size, meta=meta,
                                 commit_every=args.commit_every, show_progress=rank == 0)
    except (AugmentCacheError, AugmentInputError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if rank == 0:
        print(json.dumps({"out": str(args.out), **(totals or {})}))
    return 0
