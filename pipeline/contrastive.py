"""Caption-contrastive loss (supervised SimCSE, as LLM2Vec / LLM2CLIP stage 1), with the
negatives of every worker gathered inside the loss (as open_clip's `loss.py` does).

Each query's positive is the caption at the same index; every other caption of the
*global* batch (all workers), plus optional hard negatives, is a negative. The loss is
cross-entropy over cosine similarities times `scale` (50 = temperature 0.02).

Gathering keeps the gradient of the local part only (the others arrive through a plain
all_gather), and every rank computes the loss over the whole global batch. Its value is
then exactly the single-process loss on the same global batch, and the gradient one rank
gets is exactly the single-process gradient's share that flows through its own
embeddings; DeepSpeed/DDP *average* gradients over ranks, so `world_size` multiplies the
loss that is backpropagated (`backward_scale`) to make the update match one process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def distributed() -> tuple[int, int]:
    """(rank, world_size); (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_local_grad(x: torch.Tensor) -> torch.Tensor:
    """All ranks' `x` concatenated in rank order; only this rank's slice carries gradient.
    Every rank must pass the same shape."""
    rank, world = distributed()
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous())
    parts[rank] = x
    return torch.cat(parts, dim=0)


class ContrastiveLoss(nn.Module):
    """InfoNCE over (query, positive[, hard negative]) embeddings with global negatives."""

    def __init__(self, scale: float = 50.0, gather: bool = True):
        super().__init__()
        self.scale = scale
        self.gather = gather

    @property
    def backward_scale(self) -> float:
        """Multiply the loss by this before backward when gradients are averaged over ranks."""
        return float(distributed()[1]) if self.gather else 1.0

    def forward(self, queries: torch.Tensor, positives: torch.Tensor, hard_negatives: torch.Tensor | None = None) -> torch.Tensor:
        q = F.normalize(queries.float(), dim=-1)
        keys = F.normalize(positives.float(), dim=-1)
        negatives = F.normalize(hard_negatives.float(), dim=-1) if hard_negatives is not None else None
        if self.gather:
            q, keys = gather_with_local_grad(q), gather_with_local_grad(keys)
            negatives = gather_with_local_grad(negatives) if negatives is not None else None
        candidates = keys if negatives is None else torch.cat([keys, negatives], dim=0)
        logits = self.scale * q @ candidates.T
        labels = torch.arange(q.shape[0], device=q.device)
        return F.cross_entropy(logits, labels)
