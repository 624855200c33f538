"""The hand-written everyday-pairs CRA set: its shape, and that MiniLM can match its pairs (no Ray)."""

from __future__ import annotations

from pipeline.everyday_pairs import EVERYDAY_PAIRS, everyday_pairs
from pipeline.metrics import caption_retrieval_accuracy


def test_sixty_pairs_of_non_empty_strings():
    pairs = everyday_pairs()
    assert len(pairs) == 60 and pairs == list(EVERYDAY_PAIRS)
    for pair in pairs:
        assert isinstance(pair, tuple) and len(pair) == 2
        for text in pair:
            assert isinstance(text, str) and text.strip() == text and text


def test_no_duplicate_captions():
    texts = [text.lower() for pair in EVERYDAY_PAIRS for text in pair]
    assert len(set(texts)) == len(texts) == 120


def test_word_counts():
    assert [s for s, _ in EVERYDAY_PAIRS if not 5 <= len(s.split()) <= 12] == []
    assert [d for _, d in EVERYDAY_PAIRS if not 20 <= len(d.split()) <= 45] == []


def test_everyday_pairs_returns_a_fresh_list():
    pairs = everyday_pairs()
    pairs.clear()
    assert len(everyday_pairs()) == 60


def test_minilm_matches_the_pairs():
    from pipeline.baselines import MiniLMEncoder

    encoder = MiniLMEncoder()
    first = encoder.encode([a for a, _ in EVERYDAY_PAIRS])
    second = encoder.encode([b for _, b in EVERYDAY_PAIRS])
    assert caption_retrieval_accuracy(first, second) >= 0.85
