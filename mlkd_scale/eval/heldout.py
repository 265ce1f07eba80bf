"""Evaluation during general distillation: the held-out Stage-1 loss and the agreement with the teacher.

Every ``eval.every_n_steps`` the trainer calls :meth:`HeldoutEval.run`. On the documents
``data.heldout_fraction`` keeps out of training (:mod:`mlkd_scale.data.corpus.heldout`; the first
``eval.max_documents``, each cut to ``data.max_seq_length`` tokens, padded per batch) it computes

* ``eval/loss_<term>`` and ``eval/loss_total``: the run's own Stage-1 objective (teacher taps,
  projections, weights), in eval mode (no dropout) and without gradients, averaged over the
  batches and the ranks;
* ``eval/agreement``: the Spearman correlation of the student's and the teacher's pairwise
  similarities of the documents' mean-pooled last hidden states — what ``mlkd-scale agreement``
  computes (:mod:`mlkd_scale.eval.agreement`), here on the live student.

Every rank evaluates every document (ZeRO-3 needs all ranks in every forward); the teacher's
embeddings are computed once. ``best(...)`` says whether a result beats the best so far by
``eval.metric`` (agreement: higher; loss: lower).
"""

from __future__ import annotations

import math

import torch

from mlkd_scale.data.corpus.heldout import heldout_texts
from mlkd_scale.errors import DataError
from mlkd_scale.eval.agreement import similarity_agreement
from mlkd_scale.eval.protocol import Evaluation
from mlkd_scale.models.distillation_module import MODEL_INPUTS
from mlkd_scale.spec import RunSpec


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask[..., None].float()
    return (hidden.float() * mask).sum(1) / mask.sum(1)


class HeldoutEval:
    """The held-out batches of a run and the evaluation of its student on them."""

    def __init__(self, spec: RunSpec, tokenizer, device: torch.device):
        docs = heldout_texts(spec.data, spec.run.seed, spec.eval.max_documents)
        if len(docs) < 4:
            raise DataError(
                f"eval.every_n_steps: data.heldout_fraction {spec.data.heldout_fraction} holds out {len(docs)} "
                "documents of this corpus; evaluation needs at least 4: raise data.heldout_fraction"
            )
        self.doc_ids = [doc_id for doc_id, _ in docs]
        self.metric = spec.eval.metric
        size = spec.train.micro_batch_size
        texts = [text for _, text in docs]
        self.batches = [
            {
                k: v.to(device)
                for k, v in tokenizer(texts[i : i + size], padding=True, truncation=True,
                                      max_length=spec.data.max_seq_length, return_tensors="pt").items()
                if k in MODEL_INPUTS
            }
            for i in range(0, len(texts), size)
        ]
        self._teacher_embeddings: torch.Tensor | None = None

    @torch.no_grad()
    def _embeddings(self, model) -> torch.Tensor:
        rows = []
        for batch in self.batches:
            out = model(**batch, output_hidden_states=True)
            rows.append(_mean_pool(out.hidden_states[-1], batch["attention_mask"]).cpu())
        return torch.cat(rows)

    @torch.no_grad()
    def run(self, engine, teacher, loss_of, masker=None) -> dict[str, float]:
        """Scalars ``eval/...`` of the student in ``engine`` now; ``loss_of(batch)`` is the trainer's
        Stage-1 loss of one batch (teacher taps + student + objective). Collective."""
        if self._teacher_embeddings is None:
            self._teacher_embeddings = self._embeddings(teacher)
        engine.eval()
        try:
            sums: dict[str, torch.Tensor] = {}
            for index, batch in enumerate(self.batches):
                batch = dict(batch)
                if masker is not None:  # presets that read MLM predictions: a fixed masking of the docs
                    batch["input_ids"], batch["labels"] = masker(batch["input_ids"].cpu(), 0, index)
                    batch = {k: v.to(self.batches[0]["input_ids"].device) for k, v in batch.items()}
                total, terms = loss_of(batch)
                for name, value in {"total": total, **terms}.items():
                    sums[name] = sums.get(name, 0) + value.detach().float()
            names = sorted(sums)
            means = torch.stack([sums[n] for n in names]) / len(self.batches)
            torch.distributed.all_reduce(means)
            means /= torch.distributed.get_world_size()
            student = self._embeddings(engine.module.student)
        finally:
            engine.train()
        scalars = {f"eval/loss_{name}": value for name, value in zip(names, means.tolist())}
        scalars["eval/agreement"] = similarity_agreement(self._teacher_embeddings, student)
        return scalars

    def value(self, scalars: dict[str, float]) -> float:
        return scalars["eval/agreement" if self.metric == "agreement" else "eval/loss_total"]

    def is_better(self, value: float, best: dict | None) -> bool:
        """Whether ``value`` beats ``best`` (``{"value", ...}``) by ``eval.metric``; NaN never wins."""
        if math.isnan(value):
            return False
        if best is None:
            return True
        return value > best["value"] if self.metric == "agreement" else value < best["value"]


class HeldoutEvaluator:
    """:class:`HeldoutEval` as the general-distillation stage's evaluator: every ``every`` steps and
    at the stop step; a checkpoint only for a new best (``eval.metric``)."""

    checkpoint_each = False

    def __init__(self, heldout: HeldoutEval, every: int, engine, teacher, loss_of, masker=None):
        self.heldout, self.every = heldout, every
        self.engine, self.teacher, self.loss_of, self.masker = engine, teacher, loss_of, masker

    def due(self, step: int, stop_at: int, total: int) -> bool:
        return step % self.every == 0 or step == stop_at

    def evaluate(self) -> Evaluation:
        scalars = self.heldout.run(self.engine, self.teacher, self.loss_of, self.masker)
        record = {"metric": self.heldout.metric, "scalars": scalars}
        return Evaluation(scalars, self.heldout.value(scalars), record, history=scalars)

    def is_better(self, value: float, best: dict | None) -> bool:
        return self.heldout.is_better(value, best)

    def report(self, evaluation: Evaluation, best: dict | None, step: int, run_step: int) -> tuple[dict, str]:
        scalars = dict(evaluation.scalars)
        if best is not None:
            scalars[f"eval/best_{self.heldout.metric}"] = best["value"]
        line = (f"step {step}: held-out loss {scalars['eval/loss_total']:.4f}, "
                f"agreement {scalars['eval/agreement']:.3f}")
        return scalars, line
