"""RegionCLIP's pretraining losses (docs/method.md §5) as pure functions of tensors.

All three take *unnormalised* embeddings and normalise them here; logits are computed in float32
whatever the autocast dtype. Temperature 0.01 is the reference's fixed value.

    (a) region_concept_loss    contrastive, several positives, over the kept regions of the local batch
    (b) distillation_loss      KL(p_teacher || q_student) over the whole concept pool, mean over the kept regions
    (c) image_caption_loss     symmetric InfoNCE over the (gathered) global batch
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def concept_logits(embeddings: torch.Tensor, concepts: torch.Tensor, temperature: float) -> torch.Tensor:
    """cos(v_i, l_c) / T for every region i and concept c: [N, C] float32."""
    v = F.normalize(embeddings.float(), dim=-1)
    lc = F.normalize(concepts.float(), dim=-1)
    return v @ lc.t() / temperature


def keep_mask(teacher_prob: torch.Tensor, threshold: float = 0.1) -> torch.Tensor:
    """Regions whose teacher max probability exceeds `threshold`; all of them when none does."""
    keep = teacher_prob > threshold
    if not bool(keep.any()):
        keep = torch.ones_like(keep)
    return keep


def region_concept_loss(student_logits: torch.Tensor, pseudo_labels: torch.Tensor,
                        keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(a) For kept regions i, j: s_ij = student_logits[i, y_j] = cos(v_i, l_{y_j}) / T,
    M_ij = [y_i == y_j], loss = mean_i -log sum_j M_ij softmax_j(s_ij).

    student_logits: [N, C] (concept_logits of the student's regions); pseudo_labels: [N] int.
    """
    if keep is not None:
        student_logits, pseudo_labels = student_logits[keep], pseudo_labels[keep]
    if pseudo_labels.numel() == 0:
        return student_logits.sum() * 0.0
    y = pseudo_labels.long()
    s = student_logits.float()[:, y]                       # [K, K]: column j is concept y_j
    positives = y[:, None] == y[None, :]                   # M_ij (diagonal always true)
    log_all = torch.logsumexp(s, dim=1)
    log_pos = torch.logsumexp(s.masked_fill(~positives, float("-inf")), dim=1)
    return (log_all - log_pos).mean()


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(b) KL(p_teacher || q_student) = sum_c p_t (log p_t - log q_s), mean over the kept regions
    (keep_mask, the same regions as (a); the reference's kl_div with reduction="batchmean" over them).

    student_logits, teacher_logits: [N, C]; keep: [N] bool, None for every region.
    """
    if keep is not None:
        student_logits, teacher_logits = student_logits[keep], teacher_logits[keep]
    if student_logits.shape[0] == 0:
        return student_logits.sum() * 0.0
    log_q = F.log_softmax(student_logits.float(), dim=-1)
    log_p = F.log_softmax(teacher_logits.float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1).mean()


def image_caption_loss(image_embeddings: torch.Tensor, caption_embeddings: torch.Tensor,
                       temperature: float) -> torch.Tensor:
    """(c) Symmetric cross-entropy of logits = cos(image_i, caption_j) / T; the matching pair is the
    positive. Pass the *gathered* global batch (gather_with_grad) for the reference's loss."""
    img = F.normalize(image_embeddings.float(), dim=-1)
    cap = F.normalize(caption_embeddings.float(), dim=-1)
    logits = img @ cap.t() / temperature
    target = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient of the gathered tensor and returns this
    rank's slice (an all_reduce: works on gloo, which has no reduce_scatter)."""

    @staticmethod
    def forward(ctx, x):
        import torch.distributed as dist

        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All ranks' rows of `x` concatenated in rank order, differentiable (identity without DDP).

    Every rank computes the loss over the global batch; the backward sums the gradients of all
    ranks' copies, and DDP's average over ranks then gives exactly the single-process gradient.
    Ranks must hold the same number of rows (equal local batches).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)
