"""Prediction-layer losses on logits, in fp32."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mlkd_scale.losses.numerics import fp32_loss


@fp32_loss
def prediction_kd_loss(t_logits: torch.Tensor, s_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """L_KD, soft-label distillation: τ² · (1/B) Σ_b KL(softmax(z^T_b/τ) ‖ softmax(z^S_b/τ)).

    t_logits, s_logits [B, C] (or [B, ..., C]: every leading position is a distribution, e.g. SQuAD's
    start and end). The τ² factor keeps gradient magnitudes comparable across temperatures.
    """
    t_logp = F.log_softmax(t_logits.detach().float() / temperature, dim=-1)
    s_logp = F.log_softmax(s_logits.float() / temperature, dim=-1)
    kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1)
    return kl.mean() * temperature**2


#: Logit given to masked positions: exp() of it is exactly 0 in fp32 at any usual temperature, and it
#: stays finite (an -inf would turn 0 · (-inf) into NaN inside the KL).
MASKED_LOGIT = -1e9


def mask_span_logits(logits: torch.Tensor, span_mask: torch.Tensor) -> torch.Tensor:
    """SQuAD start/end logits ``[B, 2, L]`` in fp32 with every position outside ``span_mask`` ``[B, L]``
    (True at [CLS] and on the window's context tokens) set to :data:`MASKED_LOGIT`.

    Applied to teacher and student before :func:`prediction_kd_loss` (or
    :func:`soft_cross_entropy_loss`), the QA prediction loss of Stage 2 is, with M_b the valid
    positions of window b and softmax_M the softmax over them only::

        L_KD = τ² · 1/(2B) Σ_b Σ_{x ∈ {start, end}} KL( softmax_M(z^T_{b,x} / τ) ‖ softmax_M(z^S_{b,x} / τ) )

    i.e. the start and the end distribution are each distilled over the positions an answer (or
    "no answer", [CLS]) can point at; padding, question and separator tokens take no part (the
    teacher's logits there are arbitrary, post-processing never reads them). Soft cross-entropy
    (the tinybert preset) differs from the KL by the teacher's entropy and a 1/L factor only.
    """
    keep = span_mask.bool().unsqueeze(1)  # [B, 1, L]: the same positions for start and end
    return logits.float().masked_fill(~keep, MASKED_LOGIT)


@fp32_loss
def soft_cross_entropy_loss(t_logits: torch.Tensor, s_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """TinyBERT's prediction loss as its code computes it (TinyBERT/task_distill.py ``soft_cross_entropy``)::

        L_pred = mean_{b, c} ( −softmax(z^T_b/τ)_c · log_softmax(z^S_b/τ)_c )

    t_logits, s_logits [B, C] (or [B, ..., C]). ``.mean()`` runs over every element, so this is the
    paper's cross-entropy CE(z^T/τ, z^S/τ) divided by the C classes; no τ² factor.
    """
    t_prob = F.softmax(t_logits.detach().float() / temperature, dim=-1)
    s_logp = F.log_softmax(s_logits.float() / temperature, dim=-1)
    return (-(t_prob * s_logp)).mean()


@fp32_loss
def masked_lm_loss(s_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """DistilBERT's L_mlm: cross-entropy of the student's MLM logits on the masked tokens.

    s_logits [B, L, V], labels [B, L] with the original token id at masked positions and −100
    elsewhere (``CrossEntropyLoss(ignore_index=-100)`` in DistilBERT's distiller.py)::

        L_mlm = (1/|M|) Σ_{(b,i) ∈ M} −log softmax(z^S_{b,i})_{y_{b,i}},   M = {(b,i): y_{b,i} ≠ −100}

    A batch without masked tokens gives 0 (not NaN).
    """
    flat = labels.reshape(-1)
    per_token = F.cross_entropy(s_logits.float().reshape(flat.numel(), -1), flat, ignore_index=-100, reduction="sum")
    return per_token / (flat != -100).sum().clamp(min=1)


@fp32_loss
def label_loss(s_logits: torch.Tensor, labels: torch.Tensor, regression: bool = False) -> torch.Tensor:
    """Fine-tuning on the labels: cross-entropy of s_logits [B, C] against labels [B]; for regression
    (one output, labels [B] float) the MSE (1/B) Σ_b (z^S_b − y_b)², as BERT's and TinyBERT's code do."""
    if regression:
        return F.mse_loss(s_logits.float().reshape(-1), labels.float().reshape(-1))
    return F.cross_entropy(s_logits.float(), labels.long())


@fp32_loss
def prediction_mse_loss(t_logits: torch.Tensor, s_logits: torch.Tensor) -> torch.Tensor:
    """Regression KD (STS-B): mean of (z^S − z^T)² over the batch's outputs."""
    return F.mse_loss(s_logits.float(), t_logits.detach().float())
