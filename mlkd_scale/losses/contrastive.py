"""L_SC, the sample-contrastive relation: supervised contrastive loss over student and teacher views."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mlkd_scale.losses.numerics import fp32_loss


@fp32_loss
def sample_contrastive_loss(
    t_cls: torch.Tensor, s_cls: torch.Tensor, labels: torch.Tensor, temperature: float = 0.2
) -> torch.Tensor:
    """Same-label samples close, different-label samples apart (SupCon over 2B anchors).

    t_cls [B, d], s_cls [B, d] (the student projected to the teacher's width if they differ),
    labels [B]. The anchors z are the B student and the B teacher vectors, L2-normalised, teacher
    detached; s_ia = z_i·z_a. For anchor i with positives P(i) (other anchors with the same label,
    which always includes the other model's view of the same sample):
        ℓ_i = −(1/|P(i)|) Σ_{p∈P(i)} log( exp(s_ip/τ) / Σ_{a≠i} exp(s_ia/τ) ),
    and L_SC is the mean of ℓ_i over the anchors that have a positive. The SupCon "base temperature"
    factor τ/τ_base of some implementations is a constant scale: set it through the term's weight.

    The B samples are those of one micro step on every data-parallel rank with
    ``losses.batch_relations: global`` (the default; positives are found across ranks), or this
    rank's micro batch alone with ``local``, which makes the loss depend on the world size. Gradient
    accumulation adds no positives: each micro step is its own relation and the steps' losses are
    averaged.
    """
    if t_cls.shape[-1] != s_cls.shape[-1]:
        raise ValueError(
            f"sample_contrastive_loss needs equal widths (teacher {t_cls.shape[-1]}, student {s_cls.shape[-1]}); "
            "project the student's [CLS] first"
        )
    z = F.normalize(torch.cat([s_cls.float(), t_cls.detach().float()]), dim=-1)
    all_labels = torch.cat([labels, labels])
    not_self = ~torch.eye(z.shape[0], dtype=torch.bool, device=z.device)
    logits = (z @ z.T / temperature).masked_fill(~not_self, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    positives = (all_labels[:, None] == all_labels[None, :]) & not_self
    num_pos = positives.sum(-1)
    per_anchor = -log_prob.masked_fill(~positives, 0).sum(-1) / num_pos.clamp(min=1)
    has_pos = num_pos > 0
    return per_anchor[has_pos].mean()
