"""Task data for fine-tuning and task distillation: encoded GLUE splits and an exactly resumable sampler.

A GLUE train set fits in memory once tokenized, so every rank reads and encodes the whole split
(:func:`load_task_data`) and :class:`EpochSampler` hands each rank its share:

* epoch ``e`` visits the examples in a permutation drawn from ``(seed, stream, e)`` — the same on
  every rank — padded by wrapping to a multiple of the world size and split ``perm[rank::world]``
  (like ``torch.utils.data.DistributedSampler``);
* micro batches are always full: the last one of an epoch continues into the next epoch, so the
  data is one endless stream and a run's budget can be any number of steps;
* the position is ``(epoch, index)`` into this rank's share: a checkpoint stores it
  (:meth:`EpochSampler.state_dict`) and a resumed run continues with exactly the samples it had
  not seen yet.

Stage 1 may train on a TinyBERT-style augmentation cache (``task.augmented_dir``, written by
``launchers/augment.py``); its rows carry the label as the train file spells it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from mlkd_scale.spec import TaskSpec
from mlkd_scale.tasks.glue.task import GlueExample, GlueTask, encode_glue, get_task, load_glue

#: The tensors of an encoded split that the models take (labels separately).
TENSOR_KEYS = ("input_ids", "attention_mask", "token_type_ids", "labels")


@dataclass
class EncodedSplit:
    """One split as ``[N, L]`` tensors (``labels`` ``[N]``) plus the example ids."""

    tensors: dict[str, torch.Tensor]
    example_ids: list[str]

    def __len__(self) -> int:
        return len(self.example_ids)

    @property
    def labels(self) -> torch.Tensor:
        return self.tensors["labels"]

    def batch(self, indices: torch.Tensor | list[int], device: torch.device | str = "cpu") -> dict:
        """The rows ``indices`` as a batch dict on ``device`` (model inputs and ``labels``)."""
        index = torch.as_tensor(indices, dtype=torch.long)
        return {k: v[index].to(device, non_blocking=True) for k, v in self.tensors.items()}

    @classmethod
    def encode(cls, examples: list[GlueExample], tokenizer, max_seq_length: int, task: GlueTask) -> EncodedSplit:
        encoded = encode_glue(examples, tokenizer, max_seq_length, task)
        if "labels" not in encoded:
            raise ValueError(f"{task.name}: the split has no labels; training and evaluation need labelled data")
        return cls({k: encoded[k] for k in TENSOR_KEYS}, encoded["example_ids"])


@dataclass
class TaskData:
    """The encoded splits of one task run: train (original), Stage-1 train, dev split(s)."""

    task: GlueTask
    train: EncodedSplit
    stage1_train: EncodedSplit  # the augmentation cache when task.augmented_dir is set, else train
    dev: dict[str, EncodedSplit]  # dev split name -> split; the first one selects checkpoints

    def describe(self) -> str:
        dev = ", ".join(f"{name} {len(split):,}" for name, split in self.dev.items())
        line = f"task {self.task.name}: train {len(self.train):,} examples, dev: {dev}"
        if self.stage1_train is not self.train:
            line += f"; Stage 1 trains on {len(self.stage1_train):,} augmented examples"
        return line


def load_task_data(spec: TaskSpec, tokenizer, with_augmented: bool = True) -> TaskData:
    """Read and encode the task's train and dev splits (and the augmentation cache, for Stage 1).

    SQuAD tasks are read and cut into windows by :func:`~mlkd_scale.tasks.squad.task.load_squad_task_data`.
    """
    if spec.is_squad:
        from mlkd_scale.tasks.squad.task import load_squad_task_data

        return load_squad_task_data(spec, tokenizer)
    task = get_task(spec.name)

    def encode(examples: list[GlueExample]) -> EncodedSplit:
        return EncodedSplit.encode(examples, tokenizer, spec.max_seq_length, task)

    train = encode(load_glue(task, "train", spec.data_dir))
    dev = {split: encode(load_glue(task, split, spec.data_dir)) for split in task.dev_splits}
    stage1 = train
    if with_augmented and spec.augmented_dir is not None:
        stage1 = encode(augmented_examples(task, spec.augmented_dir))
    return TaskData(task, train, stage1, dev)


def augmented_examples(task: GlueTask, cache_dir: str) -> list[GlueExample]:
    """The rows of a finished augmentation cache as labelled examples of ``task``."""
    from mlkd_scale.data.augment.augmenter import load_augmented

    examples = []
    for row in load_augmented(cache_dir):
        if "label" not in row:
            raise ValueError(
                f"augmentation cache {cache_dir} has no 'label' field; augment the train file with --task "
                f"{task.name} (or --label_field) so that the labels are kept"
            )
        guid = f"aug-{row['example_index']}-{row['variant']}"
        examples.append(GlueExample(guid, row["text_a"], row.get("text_b"), parse_label(task, row["label"])))
    return examples


def parse_label(task: GlueTask, raw) -> int | float:
    """A label as the train file, the hub or a label name writes it -> our index (or STS-B float)."""
    if task.is_regression:
        return float(raw)
    text = str(raw).strip()
    for names in (task.file_labels, task.label_names):
        if text in names:
            return names.index(text)
    if isinstance(raw, int) and 0 <= raw < task.num_labels:
        return raw
    raise ValueError(f"label {raw!r} is not a {task.name} label (one of {list(task.file_labels)})")


def steps_for(epochs: float, max_steps: int | None, num_examples: int, global_batch: int) -> int:
    """Optimizer steps of a stage: ``max_steps``, else ceil(epochs x examples / global batch)."""
    if max_steps is not None:
        return max_steps
    return max(1, math.ceil(epochs * num_examples / global_batch))


class EpochSampler:
    """This rank's micro batches over a dataset of ``size`` examples, epoch after epoch (see module doc).

    ``stream`` separates the permutations of two users of the same seed (e.g. the two stages).
    """

    def __init__(self, size: int, micro_batch_size: int, rank: int, world_size: int, seed: int, stream: int = 0):
        if size < 1:
            raise ValueError("EpochSampler needs at least one example")
        self.size = size
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.stream = stream
        self.epoch = 0
        self.index = 0
        self._share = self._share_of(0)

    @property
    def per_rank(self) -> int:
        """Examples this rank sees per epoch (the padded share)."""
        return math.ceil(self.size / self.world_size)

    def _share_of(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.stream, epoch])
        perm = rng.permutation(self.size)
        padded = np.resize(perm, self.per_rank * self.world_size)  # wraps around, as DistributedSampler pads
        return padded[self.rank :: self.world_size]

    def next_indices(self) -> list[int]:
        """The example indices of the next micro batch (always ``micro_batch_size`` of them)."""
        out: list[int] = []
        while len(out) < self.micro_batch_size:
            if self.index >= len(self._share):
                self.epoch += 1
                self.index = 0
                self._share = self._share_of(self.epoch)
            take = min(self.micro_batch_size - len(out), len(self._share) - self.index)
            out.extend(self._share[self.index : self.index + take].tolist())
            self.index += take
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "size": self.size, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        if (state["size"], state["world_size"]) != (self.size, self.world_size):
            raise ValueError(
                f"the checkpoint's data position is for {state['size']} examples on {state['world_size']} ranks, "
                f"this run has {self.size} examples on {self.world_size} ranks; resume with the same data and "
                "world size, or start the stage afresh"
            )
        self.epoch, self.index = state["epoch"], state["index"]
        self._share = self._share_of(self.epoch)


# ---- a toy task for the quick-start ---------------------------------------------------------------

_SUBJECTS = ("the film", "this movie", "the plot", "the acting", "the script", "the soundtrack", "the ending",
             "the dialogue", "the cast", "the story", "the direction", "the camera work", "this sequel",
             "the lead performance", "the pacing", "the humour", "the final act", "the premise")
_POSITIVE = ("wonderful", "moving", "clever", "delightful", "gripping", "charming", "brilliant", "funny",
             "beautiful", "touching", "sharp", "memorable", "warm", "inventive", "thrilling", "superb")
_NEGATIVE = ("dull", "tedious", "clumsy", "boring", "predictable", "lifeless", "shallow", "messy", "bland",
             "forgettable", "painful", "flat", "confusing", "awkward", "tiresome", "weak")
_ADVERBS = ("", "really ", "truly ", "quite ", "remarkably ", "simply ", "rather ", "consistently ")
_TEMPLATES = ("{s} is {a}{w} .", "i found {s} {a}{w} .", "{s} was {a}{w} from start to finish .",
              "honestly , {s} is {a}{w} .", "{s} feels {a}{w} and {w2} .", "what a {w} experience ; {s} is {w2} .",
              "everyone says {s} is {a}{w} , and they are right .")
# Two clauses of opposite sentiment; the label is the main clause's ({w}: after "but", "although",
# "still", before "even though"), so word counting alone cannot solve them.
_CONTRAST = ("{s} is {o} , but {s2} is {a}{w} .", "although {s} is {o} , {s2} is {a}{w} .",
             "{s2} is {a}{w} , even though {s} is {o} .", "{s} was {o} ; still , {s2} was {a}{w} .")


def write_toy_sentiment(out_dir, train_size: int = 500, dev_size: int = 250, seed: int = 0) -> None:
    """A small sentiment task in the SST-2 file layout (``train.tsv``, ``dev.tsv``), from templates.

    Written for the task quick-start: every sentence is generated here (no third-party text). About
    a third of the sentences join two clauses of opposite sentiment ("the plot is dull , but the cast
    is superb ."), and a fifth of the simple ones flip their label with a negation ("is not
    wonderful"), so a model has to read the structure, not count words. Train and dev share no
    sentence.
    """
    import random
    from pathlib import Path

    rng = random.Random(seed)
    seen: set[str] = set()

    def sentence() -> tuple[str, int]:
        label = rng.randrange(2)
        words, other = (_POSITIVE, _NEGATIVE) if label else (_NEGATIVE, _POSITIVE)
        w, w2 = rng.sample(words, 2)
        s, s2 = rng.sample(_SUBJECTS, 2)
        adverb = rng.choice(_ADVERBS)
        if rng.random() < 0.35:
            return rng.choice(_CONTRAST).format(s=s, s2=s2, a=adverb, w=w, o=rng.choice(other)), label
        text = rng.choice(_TEMPLATES).format(s=s, a=adverb, w=w, w2=w2)
        if " is " in text and rng.random() < 0.2:
            text, label = text.replace(" is ", " is not ", 1), 1 - label
        return text, label

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, size in (("train.tsv", train_size), ("dev.tsv", dev_size)):
        rows = []
        while len(rows) < size:
            text, label = sentence()
            if text not in seen:
                seen.add(text)
                rows.append(f"{text}\t{label}\n")
        (out / name).write_text("sentence\tlabel\n" + "".join(rows), encoding="utf-8")


if __name__ == "__main__":  # python -m mlkd_scale.tasks.data DIR: the quick-start's toy SST-2
    import sys

    write_toy_sentiment(sys.argv[1])
