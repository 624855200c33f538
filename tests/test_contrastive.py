"""The contrastive loss with gathered negatives, MNTP masking, and the trainable encoder
(no Ray): distributed == single process, loss goes down, merged == trained."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.config import FinetuneTextConfig
from pipeline.contrastive import ContrastiveLoss
from pipeline.mntp import mntp_inputs

WORLD, LOCAL_BATCH, DIM = 2, 3, 8


def _global_batch():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(WORLD * LOCAL_BATCH, DIM, generator=g) for _ in range(3)]  # queries, positives, negatives


def _single_process(hard: bool):
    q, p, n = (t.clone().requires_grad_(True) for t in _global_batch())
    loss = ContrastiveLoss(scale=50.0, gather=False)(q, p, n if hard else None)
    loss.backward()
    return loss.item(), q.grad, p.grad


def _worker(rank: int, port: int, hard: bool, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    q, p, n = (t[rank * LOCAL_BATCH : (rank + 1) * LOCAL_BATCH].clone().requires_grad_(True) for t in _global_batch())
    loss_fn = ContrastiveLoss(scale=50.0, gather=True)
    loss = loss_fn(q, p, n if hard else None)
    (loss * loss_fn.backward_scale).backward()
    # What DDP/DeepSpeed do with parameter gradients: average over ranks. Here the
    # "parameters" are the inputs, each owned by one rank, so the average is the local
    # gradient / WORLD; backward_scale makes it the single-process gradient.
    out[rank] = (loss.item(), q.grad / WORLD, p.grad / WORLD)
    dist.destroy_process_group()


@pytest.mark.parametrize("hard", [False, True])
def test_gathered_negatives_loss_equals_the_single_process_loss(hard):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_worker, args=(port, hard, out), nprocs=WORLD, join=True)
    loss, q_grad, p_grad = _single_process(hard)
    for rank in range(WORLD):
        rank_loss, rq, rp = out[rank]
        assert rank_loss == pytest.approx(loss, rel=1e-6)
        rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        torch.testing.assert_close(rq, q_grad[rows], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rp, p_grad[rows], rtol=1e-5, atol=1e-6)


def test_loss_is_low_when_pairs_match_and_high_when_shuffled():
    x = torch.nn.functional.normalize(torch.randn(16, 32), dim=-1)
    loss = ContrastiveLoss(scale=50.0, gather=False)
    assert loss(x, x).item() < 0.01
    assert loss(x, x.roll(1, dims=0)).item() > 5


def test_mntp_masks_about_a_fifth_of_the_predictable_tokens():
    ids = torch.randint(10, 1000, (64, 40))
    mask = torch.ones_like(ids)
    mask[:, :10] = 0  # left padding
    corrupted, labels = mntp_inputs(ids, mask, mask_id=3, vocab_size=1000, ratio=0.2, generator=torch.Generator().manual_seed(0))
    chosen = labels != -100
    assert not chosen[:, :11].any()  # padding, and the first real token (nothing before it)
    share = chosen.sum().item() / (64 * 29)
    assert 0.15 < share < 0.25
    assert (labels[chosen] == ids[chosen]).all()
    masked = (corrupted == 3) & chosen
    assert 0.7 < masked.sum().item() / chosen.sum().item() < 0.9  # 80% mask, 10% random, 10% kept
    assert (corrupted[~chosen] == ids[~chosen]).all()


@pytest.fixture(scope="module")
def tiny_cfg():
    return FinetuneTextConfig(max_length=64, lora={"r": 8, "alpha": 16, "dropout": 0.0})


BATCH = {
    "first": ["a red cube left of a blue ball", "a small green cone", "a dog runs in a park", "two cups on a wooden table"],
    "second": ["a blue ball to the right of a red cube", "a tiny cone, green", "a park with a running dog", "a wooden table with two cups"],
}


def test_loss_goes_down_on_a_fixed_batch_and_the_merged_encoder_matches(models, tiny_cfg, tmp_path):
    from pipeline.finetune import TrainableEncoder, contrastive_loss, mntp_loss, save_merged
    from pipeline.text_encoder import TextEncoder

    torch.manual_seed(0)
    model = TrainableEncoder(str(models["tiny-llama"]), tiny_cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    loss_fn = ContrastiveLoss(50.0, gather=False)
    mntp = mntp_loss(model, BATCH["first"], torch.device("cpu"), torch.Generator().manual_seed(0))
    assert torch.isfinite(mntp) and mntp.item() > 0
    losses = []
    for _ in range(10):
        loss = contrastive_loss(model, BATCH, loss_fn, torch.device("cpu"))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses

    model.eval()
    trained = model.encoder.encode(BATCH["first"] + BATCH["second"])
    path, version = save_merged(str(models["tiny-llama"]), tiny_cfg, model.trainable_state(), tmp_path / "enc")
    reloaded = TextEncoder.from_pretrained(path)
    assert reloaded.encoder_version == version and reloaded.options.bidirectional
    assert reloaded.options.max_length == tiny_cfg.encoder_max_length == 512  # trained at 64, reads long captions whole
    np.testing.assert_allclose(reloaded.encode(BATCH["first"] + BATCH["second"]), trained, rtol=1e-4, atol=1e-4)
