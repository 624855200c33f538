"""Stage-2 image-text losses and feature-cached accumulation (no Ray): ClipLoss / SigLipLoss
equal written-out references; over 2 gloo processes the rank-mean loss and the DDP-averaged
gradients equal the single-process ones; k micro-batches through `contrastive_step` equal
one k-times larger batch; inexact combinations are refused."""

from __future__ import annotations

import datetime
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from pipeline.contrastive import ClipLoss, ContrastiveOutput, SigLipLoss, contrastive_step, gather_features

WORLD, B_LOCAL, DIM, K = 2, 3, 4, 3
B = WORLD * B_LOCAL
SCALE, BIAS = 7.0, -1.5
TOL = dict(rtol=1e-5, atol=1e-6)


def _global_features():
    g = torch.Generator().manual_seed(0)
    return [F.normalize(torch.randn(B, DIM, generator=g), dim=-1) for _ in range(2)]  # image, text


def _leaves(image, text):
    """Fresh leaves (image, text, scale, bias) so every call collects its own gradients."""
    return (image.clone().requires_grad_(True), text.clone().requires_grad_(True),
            torch.tensor(SCALE, requires_grad=True), torch.tensor(BIAS, requires_grad=True))


def clip_reference(image, text, scale):
    """(mean_i CE of row i of S + mean_i CE of column i of S) / 2, S = scale * image @ text.T,
    written out: CE = logsumexp - the matching logit."""
    s = scale * image @ text.T
    n = s.shape[0]
    per_image = sum(torch.logsumexp(s[i, :], 0) - s[i, i] for i in range(n)) / n
    per_text = sum(torch.logsumexp(s[:, i], 0) - s[i, i] for i in range(n)) / n
    return (per_image + per_text) / 2


def siglip_reference(image, text, scale, bias):
    """-sum_ij log sigmoid(label_ij * z_ij) / n over all n x n pairs, -log sigmoid(x) = softplus(-x)."""
    n = image.shape[0]
    total = 0.0
    for i in range(n):
        for j in range(n):
            label = 1.0 if i == j else -1.0
            total = total + F.softplus(-label * (scale * image[i] @ text[j] + bias))
    return total / n


def _reference(kind, image, text, scale, bias):
    return siglip_reference(image, text, scale, bias) if kind == "siglip" else clip_reference(image, text, scale)


LOSSES = {
    "clip_local": lambda: ClipLoss(local_loss=True, gather_with_grad=True),
    "clip_global": lambda: ClipLoss(local_loss=False, gather_with_grad=True),
    "siglip": lambda: SigLipLoss(gather_with_grad=True),
}


# --- tiny deterministic two-tower model for accumulation ---


class TwoTower(nn.Module):
    def __init__(self, with_bias: bool):
        super().__init__()
        torch.manual_seed(0)  # the same weights in every process, as DDP's broadcast makes them
        self.image = nn.Linear(6, DIM)
        self.text = nn.Linear(5, DIM)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.logit_bias = nn.Parameter(torch.tensor(-2.0)) if with_bias else None

    def forward(self, batch):
        images, texts = batch
        return ContrastiveOutput(F.normalize(self.image(images), dim=-1), F.normalize(self.text(texts), dim=-1),
                                 self.logit_scale.exp(), self.logit_bias)


def _big_batch():
    g = torch.Generator().manual_seed(1)
    n = WORLD * K * B_LOCAL
    return torch.randn(n, 6, generator=g), torch.randn(n, 5, generator=g)


def _grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def _one_big_batch(kind, images, texts):
    model = TwoTower(with_bias=kind == "siglip")
    loss = LOSSES[kind]()(model((images, texts)))
    loss.backward()
    return loss.item(), _grads(model)


def _accumulated(kind, images, texts, k):
    model = TwoTower(with_bias=kind == "siglip")
    calls = []
    micro = list(zip(images.chunk(k), texts.chunk(k)))
    loss = contrastive_step(model, micro, LOSSES[kind](), lambda t: (calls.append(1), t.backward()))
    assert len(calls) == k and not loss.requires_grad
    return loss.item(), _grads(model)


# --- (a) one process: the classes equal the written-out references ---


@pytest.mark.parametrize("kind", list(LOSSES))
def test_losses_equal_the_written_out_reference(kind):
    image, text = _global_features()
    ref_leaves, leaves = _leaves(image, text), _leaves(image, text)
    ref = _reference(kind, *ref_leaves)
    ref.backward()
    loss = LOSSES[kind]()(ContrastiveOutput(*leaves))
    loss.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    for got, want in zip(leaves, ref_leaves):
        if want.grad is None:  # ClipLoss ignores the bias
            assert got.grad is None
        else:
            torch.testing.assert_close(got.grad, want.grad, **TOL)
    assert 0.5 < loss.item() < 10  # a real loss, not a degenerate zero


def test_the_reference_can_tell_matched_from_shuffled_pairs():
    x = F.normalize(torch.randn(8, 16), dim=-1)
    assert clip_reference(x, x, 100.0) < 0.01 < 5 < clip_reference(x, x.roll(1, 0), 100.0)
    assert siglip_reference(x, x, 100.0, -10.0) < siglip_reference(x, x.roll(1, 0), 100.0, -10.0)


# --- (c) one process: k micro-batches == one k-times larger batch ---


@pytest.mark.parametrize("kind", list(LOSSES))
def test_accumulation_equals_one_larger_batch(kind):
    images, texts = _big_batch()
    loss, grads = _one_big_batch(kind, images, texts)
    acc_loss, acc_grads = _accumulated(kind, images, texts, K)
    assert acc_loss == pytest.approx(loss, rel=1e-6)
    assert set(acc_grads) == set(grads)
    for name in grads:
        torch.testing.assert_close(acc_grads[name], grads[name], **TOL, msg=name)


def test_one_micro_batch_is_a_plain_step():
    images, texts = _big_batch()
    loss, grads = _one_big_batch("clip_local", images, texts)
    acc_loss, acc_grads = _accumulated("clip_local", images, texts, 1)
    assert acc_loss == loss
    for name in grads:
        torch.testing.assert_close(acc_grads[name], grads[name], rtol=0, atol=0)


# --- (d) one process: every combination is the plain loss (the gather is the identity) ---


def test_in_one_process_every_combination_is_the_plain_loss():
    image, text = _global_features()
    out = ContrastiveOutput(image, text, torch.tensor(SCALE), torch.tensor(BIAS))
    ref = clip_reference(image, text, SCALE).item()
    for local_loss in (True, False):
        for with_grad in (True, False):
            assert ClipLoss(local_loss, with_grad)(out).item() == pytest.approx(ref, rel=1e-6)
    assert SigLipLoss(False)(out).item() == pytest.approx(SigLipLoss(True)(out).item(), rel=1e-6)
    assert ClipLoss().backward_scale == SigLipLoss().backward_scale == 1.0
    x = torch.randn(3, 2)
    assert gather_features(x, True) is x and gather_features(x, False) is x


# --- (b, c, d) over 2 gloo processes: one spawn collects everything ---


def _worker(rank: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=120))
    rows = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
    result = {}

    # gather_features: values in rank order; with_grad=True sums every rank's gradient.
    x = torch.full((B_LOCAL, 2), float(rank + 1), requires_grad=True)
    weights = torch.randn(B, 2, generator=torch.Generator().manual_seed(10 + rank))
    for with_grad in (True, False):
        x.grad = None
        y = gather_features(x, with_grad)
        (y * weights).sum().backward()
        result[f"gather_{with_grad}"] = (y.detach(), x.grad.clone())

    # (b) the losses on this rank's slice of the global batch.
    image, text = _global_features()
    for kind, make in LOSSES.items():
        leaves = _leaves(image[rows], text[rows])
        loss_fn = make()
        loss = loss_fn(ContrastiveOutput(*leaves))
        (loss * loss_fn.backward_scale).backward()
        result[kind] = (loss.item(), *(t.grad for t in leaves))

    # (c) K micro-batches of B_LOCAL on this rank; the global batch is both ranks' rows.
    images, texts = _big_batch()
    mine = slice(rank * K * B_LOCAL, (rank + 1) * K * B_LOCAL)
    for kind in ("clip_local", "siglip"):
        result[f"accumulated_{kind}"] = _accumulated(kind, images[mine], texts[mine], K)

    # (d) gather_with_grad=False is refused (before any collective, so no rank hangs).
    plain = ContrastiveOutput(image[rows], text[rows], torch.tensor(SCALE), torch.tensor(BIAS))
    for name, loss_fn in {"clip_local": ClipLoss(True, False), "clip_global": ClipLoss(False, False), "siglip": SigLipLoss(False)}.items():
        try:
            loss_fn(plain)
            result[f"refused_{name}"] = None
        except ValueError as e:
            result[f"refused_{name}"] = str(e)
    out[rank] = result
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_worker, args=(port, out), nprocs=WORLD, join=True)
    return [out[r] for r in range(WORLD)]


def test_gather_features_values_and_gradients(ranks):
    expected = torch.cat([torch.full((B_LOCAL, 2), float(r + 1)) for r in range(WORLD)])
    weights = [torch.randn(B, 2, generator=torch.Generator().manual_seed(10 + r)) for r in range(WORLD)]
    for rank, result in enumerate(ranks):
        rows = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
        for with_grad in (True, False):
            y, grad = result[f"gather_{with_grad}"]
            torch.testing.assert_close(y, expected, rtol=0, atol=0)
            # with grad: d(sum over ranks r' of <gathered, w_r'>)/d x_rank; without: own term only
            want = sum(w[rows] for w in weights) if with_grad else weights[rank][rows]
            torch.testing.assert_close(grad, want, **TOL)


@pytest.mark.parametrize("kind", list(LOSSES))
def test_distributed_loss_and_averaged_gradients_equal_one_process(ranks, kind):
    image, text = _global_features()
    ref_leaves = _leaves(image, text)
    ref = _reference(kind, *ref_leaves)
    ref.backward()
    losses = [r[kind][0] for r in ranks]
    assert sum(losses) / WORLD == pytest.approx(ref.item(), rel=1e-6)
    if kind == "clip_global":
        assert losses == pytest.approx([ref.item()] * WORLD, rel=1e-6)
    else:
        assert abs(losses[0] - losses[1]) > 1e-3  # each rank's loss alone is not the global one
    for rank, result in enumerate(ranks):
        rows = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
        _, image_grad, text_grad, _, _ = result[kind]
        # DDP/DeepSpeed average each parameter's gradient over ranks. Treat the features as
        # rows of one shared parameter that only their own rank reads: the other ranks
        # contribute zero to these rows, so the averaged gradient is this rank's / WORLD.
        torch.testing.assert_close(image_grad / WORLD, ref_leaves[0].grad[rows], **TOL)
        torch.testing.assert_close(text_grad / WORLD, ref_leaves[1].grad[rows], **TOL)
    # logit scale (and bias) are shared parameters every rank uses: plain average over ranks.
    for i, name in ((3, "scale"), (4, "bias")):
        rank_grads = [r[kind][i] for r in ranks]
        if ref_leaves[i - 1].grad is None:
            assert all(g is None for g in rank_grads), name
        else:
            torch.testing.assert_close(sum(rank_grads) / WORLD, ref_leaves[i - 1].grad, **TOL, msg=name)


@pytest.mark.parametrize("kind", ["clip_local", "siglip"])
def test_distributed_accumulation_equals_one_process_big_batch(ranks, kind):
    images, texts = _big_batch()
    loss, grads = _one_big_batch(kind, images, texts)  # WORLD * K * B_LOCAL rows in one process
    rank_results = [r[f"accumulated_{kind}"] for r in ranks]
    assert sum(l for l, _ in rank_results) / WORLD == pytest.approx(loss, rel=1e-6)
    for name in grads:
        averaged = sum(g[name] for _, g in rank_results) / WORLD  # what DDP/DeepSpeed all-reduce to
        torch.testing.assert_close(averaged, grads[name], **TOL, msg=name)


def test_gather_without_grad_is_refused_across_ranks(ranks):
    for result in ranks:
        for name in ("clip_local", "clip_global", "siglip"):
            message = result[f"refused_{name}"]
            assert message is not None and "gather_with_grad=True" in message, name
