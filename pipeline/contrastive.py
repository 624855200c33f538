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

Stage 2 (image-text): `ClipLoss` / `SigLipLoss` gather features *with* gradient
(`gather_features`) and score local rows against all columns, which is exact under gradient
averaging as it is; `contrastive_step` accumulates micro-batches with cached features so the
negatives span the whole accumulated batch.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class ContrastiveOutput(NamedTuple):
    """What a two-tower model's forward returns for an image-text contrastive loss."""

    image: torch.Tensor  # (b, d) L2-normalised image features
    text: torch.Tensor  # (b, d) L2-normalised text features
    logit_scale: torch.Tensor  # scalar, already exp()'d: logits = logit_scale * image @ text.T
    logit_bias: torch.Tensor | None = None  # scalar, sigmoid loss only


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


# --- Stage 2: image-text losses (open_clip `loss.py` style) and feature-cached accumulation ---


def _at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> float32 (logits and log-softmax in full precision); float32/64 unchanged."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


class _AllGatherSumGrad(torch.autograd.Function):
    """all_gather whose backward sums the gathered tensor's gradient over ranks (all_reduce)
    and returns this rank's slice: every rank's loss reaches every rank's features.
    Own Function rather than `torch.distributed.nn.functional.all_gather`: that one's backward
    is correct on gloo in torch 2.13 (all_to_all emulated with scatter) but it is deprecated
    (FutureWarning on every call)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        rank, world = distributed()
        ctx.rows = slice(rank * x.shape[0], (rank + 1) * x.shape[0])
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.clone(memory_format=torch.contiguous_format)  # all_reduce is in place
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rows]


def gather_features(x: torch.Tensor, with_grad: bool) -> torch.Tensor:
    """All ranks' `x` (same shape on every rank) concatenated in rank order; `x` itself
    with world size 1. with_grad=False: only this rank's slice carries gradient (the
    gradient of this rank's loss through its own rows). with_grad=True: this rank's `x`
    receives the sum over ranks of the gradients of the gathered tensor at its rows
    (every rank must then run backward through the gather, it is a collective)."""
    if distributed()[1] == 1:
        return x
    return _AllGatherSumGrad.apply(x) if with_grad else gather_with_local_grad(x)


def _refuse_local_grad_gather(name: str, gather_with_grad: bool) -> None:
    if not gather_with_grad and distributed()[1] > 1:
        raise ValueError(
            f"{name}(gather_with_grad=False) with world size > 1 is not exact: the gradient that "
            "the other ranks' loss terms send through this rank's features is dropped (and a "
            "single loss multiplier cannot restore it without also scaling the logit scale/bias "
            "gradients). Use gather_with_grad=True."
        )


class ClipLoss(nn.Module):
    """Symmetric InfoNCE (CLIP) over features gathered from all ranks, on a `ContrastiveOutput`.

    b local rows, W ranks, B = W*b. The single-process reference on the global batch is
    L = (CE(S, arange B) + CE(S.T, arange B)) / 2 with S = scale * image @ text.T (B x B).

    local_loss=True: this rank scores its own b images against all B texts and its own b
    texts against all B images, labels arange(b) + rank*b; the loss is the mean over its rows.
    local_loss=False: every rank computes the full B x B loss L.

    Exact under DeepSpeed/DDP gradient *averaging* (tested, `backward_scale` is 1):
    - local_loss=True, gather_with_grad=True (the recipe): mean over ranks of the per-rank
      losses == L; each rank's features get W * dL/d(own features) through the gather's
      backward, so the averaged parameter gradients == dL/dparams; the logit scale gradients
      average to dL/dscale.
    - local_loss=False, gather_with_grad=True: every rank's loss == L, gradients as above
      (W times redundant logit work).
    - gather_with_grad=False with world size > 1: refused in forward (ValueError). With
      local_loss it drops the other ranks' terms; without it the features would need x W
      but the logit scale x 1, which one loss multiplier cannot do.
    With world size 1 all combinations are the plain loss.
    """

    def __init__(self, local_loss: bool = True, gather_with_grad: bool = True):
        super().__init__()
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad

    @property
    def backward_scale(self) -> float:
        """Multiply the loss by this before backward (gradients averaged over ranks): always 1,
        every combination this class accepts is exact as it is."""
        return 1.0

    def forward(self, out: ContrastiveOutput) -> torch.Tensor:
        _refuse_local_grad_gather("ClipLoss", self.gather_with_grad)
        rank, _ = distributed()
        image, text, scale = _at_least_float32(out.image), _at_least_float32(out.text), _at_least_float32(out.logit_scale)
        image_all = gather_features(image, self.gather_with_grad)
        text_all = gather_features(text, self.gather_with_grad)
        if self.local_loss:
            logits_per_image = scale * image @ text_all.T
            logits_per_text = scale * text @ image_all.T
            labels = torch.arange(image.shape[0], device=image.device) + rank * image.shape[0]
        else:
            logits_per_image = scale * image_all @ text_all.T
            logits_per_text = logits_per_image.T
            labels = torch.arange(image_all.shape[0], device=image.device)
        return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


class SigLipLoss(nn.Module):
    """Sigmoid loss (SigLIP): this rank's b images against all B = W*b gathered texts,
    z_ij = scale * image_i . text_j + bias, label +1 for the matching pair (j = i + rank*b),
    -1 otherwise; loss = -sum(log_sigmoid(label * z)) / b. `logit_bias` None counts as 0.

    Normalisation: the single-process reference on the global batch is
    L = -sum over all B x B pairs / B (divided by the global batch size, i.e. the number of
    images), and the mean over ranks of the per-rank losses equals L exactly, since
    W * b = B. Gradients are exact under DDP/DeepSpeed averaging with gather_with_grad=True
    (each rank's features get W * dL/d(own features); scale and bias average to dL/d(.)).
    gather_with_grad=False with world size > 1 is refused (it drops the gradient the other
    ranks' images send through this rank's texts)."""

    def __init__(self, gather_with_grad: bool = True):
        super().__init__()
        self.gather_with_grad = gather_with_grad

    @property
    def backward_scale(self) -> float:
        """Always 1 (see the class docstring)."""
        return 1.0

    def forward(self, out: ContrastiveOutput) -> torch.Tensor:
        _refuse_local_grad_gather("SigLipLoss", self.gather_with_grad)
        rank, _ = distributed()
        image, text, scale = _at_least_float32(out.image), _at_least_float32(out.text), _at_least_float32(out.logit_scale)
        bias = _at_least_float32(out.logit_bias) if out.logit_bias is not None else 0.0
        text_all = gather_features(text, self.gather_with_grad)
        b = image.shape[0]
        logits = scale * image @ text_all.T + bias
        labels = -torch.ones_like(logits)
        labels[:, rank * b : (rank + 1) * b] += 2 * torch.eye(b, dtype=logits.dtype, device=logits.device)
        return -F.logsigmoid(labels * logits).sum() / b


def contrastive_step(
    forward: Callable[[Any], ContrastiveOutput],
    micro_batches: Iterable[Any],
    loss_fn: Callable[[ContrastiveOutput], torch.Tensor],
    backward: Callable[[torch.Tensor], Any],
) -> torch.Tensor:
    """Forward + backward of one optimizer step of a two-tower model, `forward(micro_batch)
    -> ContrastiveOutput`; returns the loss (detached) over the whole accumulated batch.

    One micro-batch: loss_fn(forward(mb)), backward(loss). k > 1 micro-batches (GradCache /
    open_clip --accum-freq): the contrastive batch spans all of them. (1) forward each under
    no_grad and cache the features; (2) loss over the concatenation (loss_fn may gather across
    ranks) and its gradients w.r.t. the cached (float32) image/text features, logit scale and
    bias; (3) per micro-batch, forward again with grad and backward(surrogate), surrogate =
    sum(image * g_image) + sum(text * g_text) (+ scale * g_scale + bias * g_bias on the first
    micro-batch only). The accumulated parameter gradients are then those of the big-batch
    loss. `backward` is called once per micro-batch and must *add* gradients without dividing
    by k: `lambda t: t.backward()`, or with DeepSpeed (gradient_accumulation_steps = k)
    `engine.backward(t, scale_wrt_gas=False); engine.step()` (DDP: no_sync but on the last).

    The forward must be deterministic (no dropout, no batch-norm in train mode) or the
    recomputed features differ from the cached ones and the gradients are wrong; it runs
    twice per micro-batch. Every rank must pass the same number and sizes of micro-batches.
    """
    micro_batches = list(micro_batches)
    if len(micro_batches) == 1:
        loss = loss_fn(forward(micro_batches[0]))
        backward(loss)
        return loss.detach()
    with torch.no_grad():
        cached = [forward(mb) for mb in micro_batches]
    sizes = [c.image.shape[0] for c in cached]
    image = _at_least_float32(torch.cat([c.image for c in cached])).requires_grad_(True)
    text = _at_least_float32(torch.cat([c.text for c in cached])).requires_grad_(True)
    scale = _at_least_float32(cached[0].logit_scale).clone().requires_grad_(True)
    bias = None if cached[0].logit_bias is None else _at_least_float32(cached[0].logit_bias).clone().requires_grad_(True)
    leaves = [image, text, scale] + ([bias] if bias is not None else [])
    loss = loss_fn(ContrastiveOutput(image, text, scale, bias))
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    g_image, g_text = grads[0].split(sizes), grads[1].split(sizes)
    for j, mb in enumerate(micro_batches):
        out = forward(mb)
        surrogate = (out.image * g_image[j]).sum() + (out.text * g_text[j]).sum()
        if j == 0:
            for value, g in zip([out.logit_scale, out.logit_bias], grads[2:]):
                if g is not None and value is not None:
                    surrogate = surrogate + (value * g).sum()
        backward(surrogate)
    return loss.detach()
