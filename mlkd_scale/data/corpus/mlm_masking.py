"""BERT's masked-language-model corruption of a packed batch, as DistilBERT distils with it.

The recipe is DistilBERT's (Sanh et al. 2019), ``Distiller.prepare_batch_mlm`` in huggingface
transformers ``examples/research_projects/distillation/distiller.py`` with the defaults of its
``train.py`` (``mlm_mask_prop`` 0.15, ``word_mask`` / ``word_rand`` / ``word_keep`` 0.8 / 0.1 / 0.1):

* exactly ``ceil(probability x candidates)`` positions of the whole batch are picked, without
  replacement, among the tokens that are not special tokens ([CLS], [SEP], [PAD], [MASK], [UNK]);
* of the picked positions 80 % become the mask token, 10 % a token drawn uniformly from the whole
  vocabulary (as DistilBERT's ``random_(vocab_size)``), 10 % keep their token;
* the labels are the original ids at the picked positions and -100 everywhere else (the
  ``ignore_index`` of the cross-entropy).

DistilBERT also weights *which* tokens are picked by their corpus frequency (``mlm_smoothing``
0.7: a token of count ``c`` is picked with weight ``max(c, 1) ** -0.7``, so rare tokens are
predicted more often; the counts come from a separate pass over the corpus,
``scripts/token_counts.py``). That needs token counts this framework does not collect; the pick
here is uniform over the non-special tokens, which is ``mlm_smoothing`` 0.

Teacher and student see the same corrupted ids (DistilBERT feeds both the output of
``prepare_batch_mlm``). The draw is a pure function of its :class:`torch.Generator`; the trainer
seeds one per micro batch from ``(run.seed, rank, step, micro batch)`` (:func:`masking_generator`),
so a resumed run corrupts every batch exactly as the uninterrupted run did.
"""

from __future__ import annotations

import hashlib
import math

import torch

#: Of the picked positions: the share replaced by the mask token, then the share replaced by a
#: random token; the rest keeps its token (DistilBERT's word_mask / word_rand / word_keep).
MASK_SHARE, RANDOM_SHARE = 0.8, 0.1
IGNORE_INDEX = -100


def mask_tokens(
    input_ids: torch.Tensor,
    special_ids: list[int] | torch.Tensor,
    mask_id: int,
    vocab_size: int,
    generator: torch.Generator,
    probability: float = 0.15,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(corrupted input_ids, labels)`` for a batch ``input_ids`` [B, L] (see the module docstring).

    The corrupted ids keep ``input_ids``' dtype, the labels are int64 [B, L]. ``input_ids`` is not
    modified. The generator must live on ``input_ids``' device (the trainer masks on the CPU, before
    the batch moves to the accelerator).
    """
    if not 0.0 < probability < 1.0:
        raise ValueError(f"the masking probability must be in (0, 1), got {probability}")
    flat = input_ids.reshape(-1)
    special = torch.as_tensor(special_ids, dtype=flat.dtype, device=flat.device)
    candidates = ~torch.isin(flat, special)
    count = math.ceil(probability * int(candidates.sum()))
    # A uniform subset of `count` candidates: the largest `count` of independent uniform scores.
    scores = torch.rand(flat.shape, generator=generator, device=flat.device)
    scores[~candidates] = -1.0
    picked = scores.topk(count).indices
    labels = torch.full(
        flat.shape, IGNORE_INDEX, dtype=torch.long, device=flat.device
    )  # as cross-entropy wants
    labels[picked] = flat[picked].long()
    corrupted = flat.clone()
    action = torch.rand(count, generator=generator, device=flat.device)
    random_ids = torch.randint(
        vocab_size, (count,), generator=generator, device=flat.device, dtype=flat.dtype
    )
    replaced = torch.where(action < MASK_SHARE, torch.full_like(random_ids, mask_id), random_ids)
    keep = action >= MASK_SHARE + RANDOM_SHARE
    corrupted[picked] = torch.where(keep, flat[picked], replaced)
    return corrupted.view_as(input_ids), labels.view_as(input_ids)


def masking_generator(seed: int, rank: int, step: int, micro_batch: int) -> torch.Generator:
    """A CPU generator seeded from ``(seed, rank, step, micro_batch)`` alone.

    Derived rather than carried along, so the masks of a step depend on nothing that happened
    before it: a run resumed at any step (or re-run) masks each micro batch identically.
    """
    key = f"mlm-mask:{seed}:{rank}:{step}:{micro_batch}".encode()
    value = int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & (2**63 - 1)
    return torch.Generator().manual_seed(value)


class BatchMasker:
    """:func:`mask_tokens` with one tokenizer's ids and one rank's seed, for the trainer's batches."""

    def __init__(self, tokenizer, vocab_size: int, probability: float, seed: int, rank: int):
        if tokenizer.mask_token_id is None:
            raise ValueError(
                f"the tokenizer {type(tokenizer).__name__} has no mask token, which masked-language modelling needs"
            )
        self.special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)))
        self.mask_id = tokenizer.mask_token_id
        self.vocab_size = vocab_size
        self.probability = probability
        self.seed, self.rank = seed, rank

    def __call__(
        self, input_ids: torch.Tensor, step: int, micro_batch: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(corrupted input_ids, labels)`` of micro batch ``micro_batch`` of optimizer step ``step``."""
        generator = masking_generator(self.seed, self.rank, step, micro_batch)
        return mask_tokens(
            input_ids, self.special_ids, self.mask_id, self.vocab_size, generator, self.probability
        )
