"""`jobs.serve` on the local cluster, against a small random LLM2CLIP model on the tiny Llama
encoder and the embedded default (`clip_store`): the index built by Ray Data (and topped up,
not rebuilt), every endpoint, every bad input refused with its reason while the service stays
up, the token required everywhere but /health, answers equal to a brute-force ranking computed
from the model directly, the page in a real browser showing what the API returns, and requests
answered while a replica is killed under load."""

from __future__ import annotations

import io
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import requests
import torch
from PIL import Image

from pipeline.store import Store
from tests.bad_images import _png_header_only
from tests.conftest import CLIP_MODELS, MODELS_DIR, connect_here, run_stage_here, write_config

APP = "llm2clip-tests-search"
TEXT = "a small red circle above a large blue square on a white background"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model(root: Path) -> Path:
    """A random LLM2CLIP model on the tiny Llama encoder (the one `clip_store` embedded with)."""
    from pipeline.clip_model import LLM2CLIP, LLM2CLIPConfig
    from pipeline.text_encoder import TextEncoder

    torch.manual_seed(0)
    encoder = TextEncoder.from_pretrained(MODELS_DIR / "tiny-llama")
    config = LLM2CLIPConfig(embed_dim=16, text_dim=encoder.dim, encoder_version=encoder.encoder_version,
                            text_encoder=str(MODELS_DIR / "tiny-llama"))
    return LLM2CLIP.build(config, MODELS_DIR / "tiny-clip-vision").save_pretrained(root / "model")


@pytest.fixture(scope="module")
def served(tmp_path_factory, clip_store, cluster, ray_session):
    root = tmp_path_factory.mktemp("serve")
    (root / "store").symlink_to(clip_store / "store")
    model = _model(root)
    (root / "token").write_text("s3cret-token\n")
    port = _free_port()
    deployment = {"cpus": 0.1, "max_batch_size": 8}  # small: the suite's cluster has 2 CPUs, and other tests' actors
    serve_cfg = {"model": str(model), "port": port, "app_name": APP, "token_file": str(root / "token"), "top_k": 5,
                 "max_text_chars": 200, "max_request_bytes": 200_000, "index_batch_size": 16, "index_cpus": 0.1, "api_cpus": 0.1,
                 "clip_deployment": {**deployment, "replicas": 2}, "text_deployment": deployment,
                 "image_limits": {"max_pixels": 1_000_000, "max_bytes": 150_000},
                 "text_precision": "fp32"}  # as the model's own API below, on any CPU (auto: bf16 where it has bf16)
    from ray import serve

    try:  # the app goes whatever happens: left running, its replicas would hold the CPUs later tests need
        # first the test split's images, then every image: the second build embeds only the others
        config = write_config(root / "serve.yaml", root / "store", cluster, models=CLIP_MODELS,
                              embedded={"num_scenes": 60, "image_size": 64}, serve={**serve_cfg, "split": "test"})
        first = run_stage_here("jobs.serve", config, cluster)
        config = write_config(root / "serve.yaml", root / "store", cluster, models=CLIP_MODELS,
                              embedded={"num_scenes": 60, "image_size": 64}, serve=serve_cfg)
        result = run_stage_here("jobs.serve", config, cluster)
        yield {"root": root, "model": model, "url": result.url, "first": first, "result": result,
               "auth": {"Authorization": "Bearer s3cret-token"}, "store": str(root / "store")}
    finally:
        connect_here(cluster)
        serve.delete(APP)


def _post(served, path: str, auth: bool = True, **kwargs) -> requests.Response:
    return requests.post(served["url"] + path, headers=(served["auth"] if auth else {}) | kwargs.pop("headers", {}), timeout=60, **kwargs)


def _png(seed: int, size=(40, 48)) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def truth(served):
    """The model, loaded here, and every dataset image's embedding in manifest order."""
    from pipeline.clip_model import LLM2CLIP

    model = LLM2CLIP.from_pretrained(served["model"])
    manifest = Store(served["store"], "manifest").read("embedded", columns=["image_id", "uri"])
    ids, uris = manifest.column("image_id").to_pylist(), manifest.column("uri").to_pylist()
    return model, ids, model.encode_image([Image.open(u).convert("RGB") for u in uris]).numpy()


def _ranking(query: np.ndarray, ids: list[str], images: np.ndarray, k: int) -> tuple[list[str], np.ndarray]:
    scores = images @ query
    order = np.argsort(-scores, kind="stable")[:k]
    return [ids[i] for i in order], scores[order]


def test_the_index_is_built_with_lineage_and_topped_up_not_rebuilt(served):
    first, result = served["first"], served["result"]
    manifest = Store(served["store"], "manifest").read("embedded", columns=["split"]).column("split").to_pylist()
    assert first.index_version == result.index_version and first.images == manifest.count("test")
    assert result.images == len(manifest) and result.embedded_now == len(manifest) - manifest.count("test")
    index = Store(served["store"], "image_index")
    assert index.num_rows(result.index_version) == len(manifest)
    lineage = index.lineage(result.index_version)
    assert [entry.stage for entry in lineage] == ["index", "index"] and lineage[0].inputs[0].version == "embedded"


def test_health_answers_without_a_token_and_nothing_else_does(served):
    health = requests.get(served["url"] + "health", timeout=30).json()
    assert health["status"] == "ok" and health["images"] == served["result"].images and health["captions"] > 0
    for path, kwargs in (("search", {"json": {"text": TEXT}}), ("embed/text", {"json": {"text": TEXT}}), ("embed/image", {"data": _png(1)})):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-token"}):
            answer = requests.post(served["url"] + path, headers=headers, timeout=30, **kwargs)
            assert answer.status_code == 401 and answer.json()["reason"] == "unauthorized", (path, headers, answer.text)


def test_text_search_equals_a_brute_force_ranking(served, truth):
    model, ids, images = truth
    answer = _post(served, "search", json={"text": TEXT, "k": 7}).json()
    expected_ids, expected_scores = _ranking(model.embed_texts([TEXT]).numpy()[0], ids, images, 7)
    assert [hit["image_id"] for hit in answer["images"]] == expected_ids
    assert np.allclose([hit["score"] for hit in answer["images"]], expected_scores, atol=1e-4)
    assert all(hit["thumbnail"].startswith("data:image/jpeg;base64,") for hit in answer["images"])
    assert answer["query"] == {"kind": "text", "truncated": False, "chars": len(TEXT)}
    default = _post(served, "search", json={"text": TEXT}).json()
    assert [hit["image_id"] for hit in default["images"]] == expected_ids[:5]  # serve.top_k


def test_image_search_equals_a_brute_force_ranking_and_names_captions(served, truth):
    model, ids, images = truth
    photo = _png(3)
    answer = _post(served, "search?k=6", data=photo, headers={"Content-Type": "image/png"}).json()
    query = model.encode_image([Image.open(io.BytesIO(photo)).convert("RGB")]).numpy()[0]
    expected_ids, expected_scores = _ranking(query, ids, images, 6)
    assert [hit["image_id"] for hit in answer["images"]] == expected_ids
    assert np.allclose([hit["score"] for hit in answer["images"]], expected_scores, atol=1e-4)
    # the nearest captions: the dataset's captions as the embedding store holds them (the model's
    # encoder, stored in float16), through the model's adapter; the best of them all comes first
    store = served["store"]
    texts = {}
    for version in ("provided", "original"):
        rows = Store(store, "captions").read(version, columns=["caption_id", "text"])
        texts.update(zip(rows.column("caption_id").to_pylist(), rows.column("text").to_pylist()))
    from pipeline.store import embedding_matrix

    stored = Store(store, "embeddings").read(model.config.encoder_version, columns=["caption_id", "embedding"])
    keep = [i for i, c in enumerate(stored.column("caption_id").to_pylist()) if c in texts]
    stored = stored.take(keep)
    scores = model.encode_text(embedding_matrix(stored.column("embedding"))).numpy() @ query
    score_of = {texts[c]: s for c, s in zip(stored.column("caption_id").to_pylist(), scores)}
    captions = answer["captions"]
    assert len(captions) == 6 and len({c["text"] for c in captions}) == 6
    assert np.allclose([score_of[c["text"]] for c in captions], [c["score"] for c in captions], atol=1e-4)
    assert captions[0]["score"] == pytest.approx(max(score_of.values()), abs=1e-4)
    assert [c["score"] for c in captions] == sorted((c["score"] for c in captions), reverse=True)


def test_embeddings_equal_the_models(served, truth):
    model = truth[0]
    text = _post(served, "embed/text", json={"text": TEXT}).json()
    assert text["dim"] == 16 and np.allclose(text["embedding"], model.embed_texts([TEXT]).numpy()[0], atol=1e-5)
    photo = _png(4)
    image = _post(served, "embed/image", data=photo).json()
    assert np.allclose(image["embedding"], model.encode_image([Image.open(io.BytesIO(photo)).convert("RGB")]).numpy()[0], atol=1e-5)


def test_bad_inputs_get_their_reason_and_the_service_stays_up(served, truth):
    bomb, huge = _png_header_only(2000, 2000), _png(5, (400, 400))  # 4M pixels > 1M; 400x400 noise > 150 kB
    cases = [
        ("search", {"json": {"text": ""}}, 400, "empty_text"),
        ("search", {"json": {"text": "   \n"}}, 400, "empty_text"),
        ("search", {"json": {"text": 7}}, 400, "bad_field"),
        ("search", {"json": {"k": 3}}, 400, "no_query"),
        ("search", {"json": {"text": TEXT, "k": 0}}, 400, "bad_field"),
        ("search", {"json": {"text": TEXT, "k": 101}}, 400, "bad_field"),
        ("search", {"data": b"{not json", "headers": {"Content-Type": "application/json"}}, 400, "bad_json"),
        ("search", {"json": [TEXT]}, 400, "bad_json"),
        ("search", {"data": b"this is not an image", "headers": {"Content-Type": "image/png"}}, 400, "not_an_image"),
        ("search", {"data": b"", "headers": {"Content-Type": "image/png"}}, 400, "no_query"),
        ("search?k=abc", {"data": _png(1), "headers": {"Content-Type": "image/png"}}, 400, "bad_field"),
        ("embed/image", {"data": bomb}, 413, "decompression_bomb"),
        ("embed/image", {"data": _png(6)[:200]}, 400, "truncated_or_corrupt"),
        ("embed/image", {"data": huge}, 413, "request_too_large"),
        ("embed/text", {"json": {"text": "x" * 300_000}}, 413, "request_too_large"),
        ("nothing/here", {"json": {"text": TEXT}}, 404, "not_found"),
    ]
    for path, kwargs, status, reason in cases:
        answer = _post(served, path, **kwargs)
        assert answer.status_code == status and answer.json()["reason"] == reason, (path, answer.status_code, answer.text)
        assert answer.json()["detail"]
    # an over-long text is cut, not refused, and says so: the answer is the cut text's
    long = TEXT + " and " + "a green triangle " * 20
    answer = _post(served, "search", json={"text": long}).json()
    assert answer["query"] == {"kind": "text", "truncated": True, "chars": len(long)}
    model, ids, images = truth
    assert [h["image_id"] for h in answer["images"]] == _ranking(model.embed_texts([long[:200]]).numpy()[0], ids, images, 5)[0]
    assert requests.get(served["url"] + "health", timeout=30).json()["status"] == "ok"


def test_the_page_shows_what_the_api_returns(served, tmp_path):
    from tests.browser import search_page

    photo = tmp_path / "query.png"
    photo.write_bytes(_png(8))
    by_text = [h["image_id"] for h in _post(served, "search", json={"text": TEXT, "k": 10}).json()["images"]]
    by_image = _post(served, "search?k=10", data=photo.read_bytes(), headers={"Content-Type": "image/png"}).json()
    seen = search_page(served["url"], "s3cret-token", TEXT, photo, tmp_path)
    assert seen.text_results == by_text
    assert seen.image_results == [h["image_id"] for h in by_image["images"]]
    assert seen.image_captions == [c["image_id"] for c in by_image["captions"]]
    assert seen.unauthorized_status.startswith("unauthorized")


def test_requests_are_answered_while_a_replica_is_killed_under_load(served):
    """Four clients search for 12 s (text and image in turn); a ClipTowers replica is killed at 4 s.
    Serve starts another; every request is answered (retried on a live replica)."""
    from ray.util.state import list_actors

    results: list[tuple[float, int]] = []
    stop = time.monotonic() + 12
    photo = _png(9)

    def client(n: int) -> None:
        i = 0
        while time.monotonic() < stop:
            started = time.perf_counter()
            if (n + i) % 2:
                answer = _post(served, "search", json={"text": f"{TEXT} number {i}"})
            else:
                answer = _post(served, "search", data=photo, headers={"Content-Type": "image/png"})
            results.append((time.perf_counter() - started, answer.status_code))
            i += 1

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    time.sleep(4)
    replicas = [a for a in list_actors(filters=[("state", "=", "ALIVE")]) if a.class_name.endswith("ClipTowers")]
    assert len(replicas) == 2, replicas
    ray.kill(ray.get_actor(replicas[0].name, namespace=replicas[0].ray_namespace), no_restart=True)
    for t in threads:
        t.join()
    statuses = [status for _, status in results]
    latencies = sorted(seconds for seconds, _ in results)
    print(f"{len(results)} requests in 12 s, p50 {latencies[len(latencies) // 2] * 1000:.0f} ms, "
          f"p99 {latencies[int(len(latencies) * 0.99)] * 1000:.0f} ms, failed {sum(s != 200 for s in statuses)}")
    assert len(results) > 8 and statuses.count(200) == len(statuses), statuses
