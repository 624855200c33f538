"""The engine-free parts of jobs.serve: nearest neighbours (exact, with evaluate's tie order, and
faiss HNSW past the threshold), and the request checks (texts, images, sizes, the token)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline import serve_requests as checks
from pipeline.config import ImageLimits
from pipeline.metrics import retrieval_scores
from pipeline.search_index import VectorIndex, top_k
from tests.bad_images import _png_header_only


def test_exact_search_ranks_as_evaluate_does_ties_by_order():
    scores = np.array([[0.5, 0.9, 0.5, 0.9, 0.1], [0.0, 0.0, 0.0, 0.0, 0.0]])
    assert top_k(scores, 3).tolist() == [[1, 3, 0], [0, 1, 2]]
    assert top_k(scores, 9).tolist() == [[1, 3, 0, 2, 4], [0, 1, 2, 3, 4]]
    rng = np.random.default_rng(0)
    images, texts = rng.standard_normal((40, 8)), rng.standard_normal((40, 8))
    index = VectorIndex(images)
    assert index.kind == "exact"
    hits = index.search(texts, 5)
    # text i describes image i: the share found in the top 5 is evaluate's text->image R@5
    found = np.mean([i in h.rows for i, h in enumerate(hits)])
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    assert found == pytest.approx(retrieval_scores(unit(images) @ unit(texts).T, np.eye(40, dtype=bool), [5])["t2i_r@5"])
    assert np.allclose(hits[0].scores, np.sort(unit(images) @ unit(texts)[0])[::-1][:5], atol=1e-6)


def test_hnsw_answers_from_the_threshold_on_and_finds_the_exact_neighbours():
    rng = np.random.default_rng(1)
    data = rng.standard_normal((2000, 32)).astype(np.float32)
    assert VectorIndex(data, approximate_from=2001).kind == "exact"
    approx, exact = VectorIndex(data, approximate_from=2000, ef_search=256), VectorIndex(data)
    assert approx.kind == "hnsw"
    queries = rng.standard_normal((50, 32))
    overlap = np.mean([len(set(a.rows) & set(b.rows)) / 10 for a, b in zip(approx.search(queries, 10), exact.search(queries, 10))])
    assert overlap > 0.95
    with pytest.raises(ValueError, match="dim 31"):
        exact.search(queries[:, :31], 3)


def test_text_checks_refuse_what_cannot_be_searched_and_cut_what_is_too_long():
    for value, reason in ((None, "no_query"), ("", "empty_text"), (" \n\t", "empty_text"), (3, "bad_field"), (["a"], "bad_field")):
        with pytest.raises(checks.BadRequest) as refused:
            checks.text_query(value, 10)
        assert refused.value.reason == reason and refused.value.status == 400
    assert checks.text_query("0123456789abc", 10) == checks.TextQuery("0123456789", True, 13)
    assert checks.text_query("short", 10) == checks.TextQuery("short", False, 5)
    for value in (0, 101, True, "5", 2.0):
        with pytest.raises(checks.BadRequest, match="'k' must be"):
            checks.positive_int(value, "k", 10, 100)
    assert checks.positive_int(None, "k", 10, 100) == 10
    with pytest.raises(checks.BadRequest) as refused:
        checks.check_size(11, 10)
    assert (refused.value.reason, refused.value.status) == ("request_too_large", 413)


def test_image_checks_refuse_with_ingests_reasons():
    limits = ImageLimits(max_pixels=1_000_000, max_bytes=100_000, max_side=2048)
    out = io.BytesIO()
    Image.new("RGBA", (30, 20), (255, 0, 0, 128)).save(out, format="PNG")
    image = checks.image_query(out.getvalue(), limits)
    assert image.mode == "RGB" and image.size == (30, 20)
    cases = [(b"not an image", "not_an_image", 400), (b"", "empty_file", 400), (_png_header_only(2000, 2000), "decompression_bomb", 413),
             (_png_header_only(4000, 10), "too_large", 413), (out.getvalue()[:60], "truncated_or_corrupt", 400),
             (b"x" * 100_001, "file_too_large", 413)]
    for data, reason, status in cases:
        with pytest.raises(checks.BadRequest) as refused:
            checks.image_query(data, limits)
        assert (refused.value.reason, refused.value.status) == (reason, status)


def test_the_token_is_required_exactly(monkeypatch, tmp_path):
    auth = checks.BearerAuth("abc")
    auth.check("Bearer abc")
    auth.check("bearer abc")
    for header in (None, "", "abc", "Bearer", "Bearer abcd", "Basic abc", "Bearer ab"):
        with pytest.raises(checks.BadRequest) as refused:
            auth.check(header)
        assert (refused.value.reason, refused.value.status) == ("unauthorized", 401)
    assert "abc" not in repr(auth)
    monkeypatch.delenv("TOKEN_VAR", raising=False)
    with pytest.raises(ValueError, match="no bearer token"):
        checks.read_token("TOKEN_VAR", None)
    (tmp_path / "token").write_text("from-file\n")
    assert checks.read_token("TOKEN_VAR", str(tmp_path / "token")) == "from-file"
    monkeypatch.setenv("TOKEN_VAR", "from-secret")
    assert checks.read_token("TOKEN_VAR", str(tmp_path / "token")) == "from-secret"
