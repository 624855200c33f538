"""Metrics on small matrices whose answers are worked out by hand."""

import numpy as np
import pytest

from pipeline.metrics import caption_retrieval_accuracy, retrieval_recall


def test_cra_by_hand():
    # pairs (a0, b0), (a1, b1), (a2, b2) in 2-D
    first = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    second = np.array([[0.9, 0.1], [0.1, 0.9], [-1.0, 0.2]])
    # a0 -> b0 (0.99) yes; a1 -> b1 yes; a2=(1,1)/sqrt2: best of a0,b0,a1,b1 ties near 0.7, b2 is far: miss
    # b0 -> a0 yes; b1 -> a1 yes; b2=(-1,.2): nearest is a1 (0.196) vs a2 (-0.55): miss
    assert caption_retrieval_accuracy(first, second) == pytest.approx(4 / 6)
    assert caption_retrieval_accuracy(first[:2], second[:2]) == 1.0


def test_cra_scale_invariant_and_checks():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 8)), rng.normal(size=(5, 8))
    assert caption_retrieval_accuracy(a, b) == caption_retrieval_accuracy(a * 3, b * 0.1)
    with pytest.raises(ValueError):
        caption_retrieval_accuracy(a, b[:4])


def test_recall_by_hand():
    images = np.array([[1.0, 0.0], [0.0, 1.0]])
    # texts 0,1 belong to image 0; text 2 to image 1
    texts = np.array([[0.0, 1.0], [1.0, 0.1], [0.7, 0.7]])
    r = retrieval_recall(images, texts, [0, 0, 1], ks=(1, 2))
    # image0's ranking: t1 (0.995), t2 (0.707), t0 (0) -> hit at 1
    # image1's ranking: t0 (1.0), t2 (0.707), t1 -> t2 at rank 2
    assert r["i2t_r@1"] == 0.5 and r["i2t_r@2"] == 1.0
    # t0 -> image1 (miss at 1, hit at 2); t1 -> image0 (hit); t2 -> tie (0.707 each): stable order picks image0 -> miss
    assert r["t2i_r@1"] == pytest.approx(1 / 3) and r["t2i_r@2"] == 1.0
