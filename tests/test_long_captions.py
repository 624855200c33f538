"""The long-caption CRA set (shape, paraphrases, families) and the MiniLM baseline (no Ray)."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest

from pipeline.baselines import MiniLMEncoder, minilm_path
from pipeline.long_captions import DETAIL_GROUPS, LongCaptionPair, long_caption_cra, long_caption_pairs


@pytest.fixture(scope="module")
def pairs() -> list[LongCaptionPair]:
    return long_caption_pairs()


def _families(pairs: list[LongCaptionPair]) -> list[list[LongCaptionPair]]:
    families: dict[int, list[LongCaptionPair]] = {}
    for pair in pairs:
        families.setdefault(pair.family, []).append(pair)
    return list(families.values())


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z'-]+", text.lower())


def _trigram_jaccard(a: str, b: str) -> float:
    ga, gb = (set(zip(w, w[1:], w[2:])) for w in (_words(a), _words(b)))
    return len(ga & gb) / len(ga | gb)


def _sentences(text: str) -> list[str]:
    return re.split(r"(?<=\.) ", text)


def _vocabulary_jaccard(a: LongCaptionPair, b: LongCaptionPair) -> float:
    va, vb = (set(_words(p.first + " " + p.second)) for p in (a, b))
    return len(va & vb) / len(va | vb)


def test_size_and_word_counts(pairs):
    assert len(pairs) == 160 and len(_families(pairs)) == 40
    for pair in pairs + long_caption_pairs(10, seed=7):
        for text in (pair.first, pair.second):
            assert 80 <= len(text.split()) <= 140, text


def test_deterministic_per_seed():
    assert long_caption_pairs(6, seed=3) == long_caption_pairs(6, seed=3)
    other = long_caption_pairs(6, seed=4)
    assert all(a.first != b.first for a, b in zip(long_caption_pairs(6, seed=3), other))
    assert long_caption_pairs(8, seed=3)[:24] == long_caption_pairs(6, seed=3)  # growing appends
    with pytest.raises(ValueError):
        long_caption_pairs(4, family_size=6)  # more members than the values of a varied slot


def test_paraphrases_reword_but_keep_details(pairs):
    for pair in pairs:
        assert _trigram_jaccard(pair.first, pair.second) < 0.5, pair
        first, second = _sentences(pair.first), _sentences(pair.second)
        assert len(first) == len(second) == 9 and first[0] != second[0]
        assert len(set(first) & set(second)) <= 4  # most sentences are re-structured
        for _, key in pair.details:
            assert key in pair.first.lower() and key in pair.second.lower(), (key, pair)


def test_families_differ_in_two_or_three_spread_details(pairs):
    within, across = [], []
    for family in _families(pairs):
        slots = [slot for slot, _ in family[0].details]
        assert 2 <= len(slots) <= 3
        # at most one varied detail per part of the text (beginning, middle, end)
        assert all(sum(slot in group for slot in slots) <= 1 for group in DETAIL_GROUPS)
        for a, b in itertools.combinations(family, 2):
            assert [s for s, _ in a.details] == [s for s, _ in b.details] == slots
            assert all(ka != kb for (_, ka), (_, kb) in zip(a.details, b.details))  # every detail differs
            within.append(_vocabulary_jaccard(a, b))
    for a, b in itertools.combinations(pairs[::4], 2):  # one member per family
        across.append(_vocabulary_jaccard(a, b))
    assert min(within) > 0.4 and np.mean(within) > 2 * np.mean(across)


def test_cra_oracle_and_constant(pairs):
    scene_of = {text: i for i, p in enumerate(pairs) for text in (p.first, p.second)}
    oracle = lambda texts: np.eye(len(pairs))[[scene_of[t] for t in texts]]  # noqa: E731
    assert long_caption_cra(oracle, pairs) == 1.0
    constant = lambda texts: np.ones((len(texts), 4))  # noqa: E731
    assert long_caption_cra(constant, pairs) < 0.01


def test_minilm_ranks_a_paraphrase_above_an_unrelated_sentence():
    encoder = MiniLMEncoder()
    texts = [
        "A man is playing a guitar on a street corner.",
        "On the corner of the street, a guy strums his guitar.",
        "The quarterly tax report is due at the end of March.",
    ]
    emb = encoder.encode(texts, batch_size=2)
    assert emb.shape == (3, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.3
    np.testing.assert_allclose(encoder.encode(texts[:1])[0], emb[0], atol=1e-5)  # batch-independent


def test_minilm_path_explains_a_missing_package(monkeypatch):
    assert (minilm_path() / "model.safetensors").is_file()
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install"):
        minilm_path()
