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


# ------------------------------------------------- retrieval, zero-shot, chance on hand-built matrices
from pipeline.metrics import (  # noqa: E402
    class_embeddings,
    confusion_matrix,
    cra_protocol,
    mean_per_class_recall,
    recall_curve,
    retrieval_chance,
    retrieval_scores,
    zero_shot_scores,
)

# 3 images x 4 texts; text 0, 1 describe image 0, text 2 image 1, text 3 image 2.
SIMS = np.array([
    [0.1, 0.9, 0.8, 0.0],   # image 0 ranks t1, t2, t0, t3: its caption t1 is first -> hit @1
    [0.7, 0.2, 0.3, 0.6],   # image 1 ranks t0, t3, t2, t1: its t2 is third -> miss @1, @2; hit @3
    [0.5, 0.4, 0.1, 0.2],   # image 2 ranks t0, t1, t3, t2: its t3 is third -> hit @3
])
POS = np.array([[1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=bool)
# texts -> images: t0 ranks i1 (.7), i2 (.5), i0 (.1): own i0 third. t1: i0 (.9) first. t2: i0 (.8), i1 (.3): second.
# t3: i1 (.6), i2 (.2), i0: own i2 second.


def test_retrieval_scores_by_hand():
    r = retrieval_scores(SIMS, POS, ks=(1, 2, 3))
    assert r == {"i2t_r@1": 1 / 3, "t2i_r@1": 1 / 4, "i2t_r@2": 1 / 3, "t2i_r@2": 3 / 4, "i2t_r@3": 1.0, "t2i_r@3": 1.0}


def test_recall_curve_matches_the_scores():
    i2t, t2i = recall_curve(SIMS, POS, 4)
    assert i2t.tolist() == [1 / 3, 1 / 3, 1.0, 1.0] and t2i.tolist() == [1 / 4, 3 / 4, 1.0, 1.0]


def test_a_text_shared_by_two_images_has_both_as_positives():
    sims = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7]])
    pos = np.array([[1, 0], [1, 0], [0, 1]], dtype=bool)  # "a red circle" describes images 0 and 1
    r = retrieval_scores(sims, pos, ks=(1,))
    assert r == {"i2t_r@1": 1.0, "t2i_r@1": 1.0}  # image 1's top text is its own (shared) caption


def test_ties_keep_index_order():
    sims = np.zeros((2, 2))
    assert retrieval_scores(sims, np.eye(2, dtype=bool), ks=(1,)) == {"i2t_r@1": 0.5, "t2i_r@1": 0.5}


def test_retrieval_chance_by_hand():
    c = retrieval_chance(POS, ks=(1, 2))
    # i2t: image 0 has 2 of 4 texts -> 1/2 @1, 1 - (2/4)(1/3) = 5/6 @2; images 1, 2 have 1 of 4 -> 1/4, 1/2
    assert c["i2t_r@1"] == pytest.approx((1 / 2 + 1 / 4 + 1 / 4) / 3)
    assert c["i2t_r@2"] == pytest.approx((5 / 6 + 1 / 2 + 1 / 2) / 3)
    # t2i: every text has 1 of 3 images -> 1/3 @1, 2/3 @2
    assert c["t2i_r@1"] == pytest.approx(1 / 3) and c["t2i_r@2"] == pytest.approx(2 / 3)


def test_class_embedding_is_the_mean_of_normalised_templates():
    # class 0: templates (2, 0) and (0, 5) -> unit (1, 0), (0, 1) -> mean (.5, .5) -> (1, 1)/sqrt2
    emb = class_embeddings(np.array([[[2.0, 0.0], [0.0, 5.0]], [[-1.0, 0.0], [-3.0, 0.0]]]))
    assert emb[0] == pytest.approx([2**-0.5, 2**-0.5]) and emb[1] == pytest.approx([-1.0, 0.0])
    with pytest.raises(ValueError):
        class_embeddings(np.zeros((2, 3)))


def test_zero_shot_top_k_and_confusion_by_hand():
    sims = np.array([
        [0.9, 0.1, 0.0],  # true 0: ranked 1st
        [0.5, 0.4, 0.1],  # true 1: 2nd
        [0.6, 0.3, 0.2],  # true 2: 3rd
        [0.0, 0.2, 0.8],  # true 2: 1st
    ])
    labels = [0, 1, 2, 2]
    assert zero_shot_scores(sims, labels, ks=(1, 2, 5)) == {"top1": 0.5, "top2": 0.75}  # k=5 > 3 classes: left out
    assert confusion_matrix(sims, labels).tolist() == [[1, 0, 0], [1, 0, 0], [1, 0, 1]]
    # per true class: 1/1, 0/1, 1/2 -> 1/2 (top-1 accuracy is also 1/2 here; below they differ)
    assert mean_per_class_recall(confusion_matrix(sims, labels)) == 0.5


def test_mean_per_class_recall_weighs_classes_not_images_and_skips_empty_ones():
    # class 0: 3 of 3 right; class 1: 0 of 1; class 2: no image (left out, not a zero)
    confusion = np.array([[3, 0, 0], [1, 0, 0], [0, 0, 0]])
    assert mean_per_class_recall(confusion) == 0.5  # accuracy would be 3/4
    with pytest.raises(ValueError):
        mean_per_class_recall(np.zeros((2, 2), dtype=int))


def test_cra_protocol_names_the_pool():
    line = cra_protocol(60)
    assert "60 caption pairs" in line and "120 captions" in line and "other 119" in line and "top-1" in line
