"""jobs.serve's costs: how long the image index takes to answer, exact and approximate, at 10k
and 100k vectors (synthetic), and what a running service sustains under concurrent clients.

    python -m bench.serve index [--sizes 10000 100000] [--dim 1280]
    python -m bench.serve load --url http://127.0.0.1:8000/ --token-file .run/serve/token [--clients 4 --seconds 30]
    python -m bench.serve heldout --config configs/local.yaml --results .run/evaluate/eval-.../results.json --model llm2clip

heldout: the service (deployed with serve.split=test) against jobs.evaluate's text->image R@5 on
the held-out dense captions (the `heldout.long` view, built by evaluate's own code): the share
of captions whose image the service returns in its top 5, beside the figure evaluate reported.

index: unit random vectors with clustered structure (so neighbours are not all equally far);
one query at a time (what a request does), the median and p99 over 200 queries; the HNSW
graph's (faiss, M=32) recall@10 against exact search at each efSearch, and its build time.
Exact search is the baseline of the run.
load: N clients, each sending its next request when the last is answered, for a fixed time;
text search and image search separately; p50 and p99 latency, requests per second, errors.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import threading
import time
from pathlib import Path

import numpy as np


def _vectors(n: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    centres = rng.standard_normal((max(16, n // 500), dim)).astype(np.float32)
    x = centres[rng.integers(0, len(centres), n)] + 0.5 * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _timed(index, probes: np.ndarray, k: int) -> tuple[list[float], list[set[int]]]:
    times, found = [], []
    for q in probes:
        t = time.perf_counter()
        hits = index.search(q, k)[0]
        times.append(time.perf_counter() - t)
        found.append(set(hits.rows.tolist()))
    return times, found


def bench_index(sizes: list[int], dim: int, efs: list[int], queries: int = 200, k: int = 10) -> list[dict]:
    from pipeline.search_index import VectorIndex

    rng = np.random.default_rng(0)
    rows = []
    for n in sizes:
        data = _vectors(n, dim, rng)
        probes = _vectors(queries, dim, rng)
        times, truth = _timed(VectorIndex(data), probes, k)
        exact = {"vectors": n, "dim": dim, "index": "exact", "ms_p50": round(1000 * statistics.median(times), 3),
                 "ms_p99": round(1000 * float(np.quantile(times, 0.99)), 3), "recall_at_10": 1.0}
        print(json.dumps(exact))
        rows.append(exact)
        started = time.perf_counter()
        approx = VectorIndex(data, approximate_from=1)
        build = time.perf_counter() - started
        for ef in efs:
            approx.graph.hnsw.efSearch = ef
            times, found = _timed(approx, probes, k)
            row = {"vectors": n, "dim": dim, "index": f"hnsw M=32 ef={ef}", "build_s": round(build, 2),
                   "ms_p50": round(1000 * statistics.median(times), 3), "ms_p99": round(1000 * float(np.quantile(times, 0.99)), 3),
                   "recall_at_10": round(float(np.mean([len(a & b) / k for a, b in zip(found, truth)])), 4)}
            row["exact_over_this"] = round(exact["ms_p50"] / row["ms_p50"], 1)
            print(json.dumps(row))
            rows.append(row)
    return rows


def _png(seed: int) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(out, format="PNG")
    return out.getvalue()


def bench_load(url: str, token: str, clients: int, seconds: float) -> list[dict]:
    import requests

    url = url.rstrip("/") + "/"
    auth = {"Authorization": f"Bearer {token}"}
    texts = ["a small red circle above a large blue square on a white background",
             "two green triangles to the left of a yellow star, with a purple rectangle at the bottom right"]
    images = [_png(i) for i in range(4)]

    def text_request(i: int) -> requests.Response:
        return requests.post(url + "search", json={"text": f"{texts[i % 2]} ({i})"}, headers=auth, timeout=60)

    def image_request(i: int) -> requests.Response:
        return requests.post(url + "search", data=images[i % 4], headers=auth | {"Content-Type": "image/png"}, timeout=60)

    rows = []
    for kind, send in (("text search", text_request), ("image search", image_request)):
        send(0)  # warm: the first request of a kind loads nothing, but compiles paths
        latencies, errors, lock = [], [], threading.Lock()
        stop = time.monotonic() + seconds

        def client(n: int) -> None:
            i = n
            while time.monotonic() < stop:
                t = time.perf_counter()
                try:
                    ok = send(i).status_code == 200
                except requests.RequestException:
                    ok = False
                with lock:
                    (latencies if ok else errors).append(time.perf_counter() - t)
                i += clients

        threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - started
        row = {"kind": kind, "clients": clients, "seconds": round(wall, 1), "requests": len(latencies), "errors": len(errors),
               "p50_ms": round(1000 * statistics.median(latencies), 1) if latencies else None,
               "p99_ms": round(1000 * float(np.quantile(latencies, 0.99)), 1) if latencies else None,
               "per_second": round(len(latencies) / wall, 2)}
        print(json.dumps(row))
        rows.append(row)
    return rows


def bench_heldout(url: str, token: str, config: str, results: str, model: str, k: int = 5) -> dict:
    import requests

    from pipeline.config import EvalSet, load_config
    from pipeline.eval_views import Views, dataset_views

    cfg = load_config(config)
    views = Views()
    dataset_views(cfg.store.uri, EvalSet(name="heldout", kind="dataset", split="test"), cfg.ingest.dataset, views)
    (view,) = [v for v in views.retrieval if v.name == "heldout.long"]
    auth = {"Authorization": f"Bearer {token}"}
    found = []
    for j, text in enumerate(view.texts):
        answer = requests.post(url.rstrip("/") + "/search", json={"text": text, "k": k}, headers=auth, timeout=60).json()
        top = {hit["image_id"] for hit in answer["images"]}
        found.append(any(view.image_ids[i] in top for i in np.flatnonzero(view.positives[:, j])))
    reported = next(r for r in json.loads(Path(results).read_text())["rows"] if r["model"] == model)[f"heldout.long/t2i_r@{k}"]
    row = {"captions": len(view.texts), "images": len(view.image_ids), f"service_top{k}": round(float(np.mean(found)), 4),
           f"evaluate_t2i_r@{k}": round(reported, 4)}
    print(json.dumps(row))
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    index = sub.add_parser("index")
    index.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    index.add_argument("--dim", type=int, default=1280, help="the authors' joint space (EVA02-L/14 + adapter) is 1280-d")
    index.add_argument("--ef", type=int, nargs="+", default=[128, 512], help="HNSW efSearch values to measure")
    load = sub.add_parser("load")
    load.add_argument("--url", default="http://127.0.0.1:8000/")
    load.add_argument("--token-file", default=".run/serve/token")
    load.add_argument("--clients", type=int, default=4)
    load.add_argument("--seconds", type=float, default=30)
    heldout = sub.add_parser("heldout")
    heldout.add_argument("--url", default="http://127.0.0.1:8000/")
    heldout.add_argument("--token-file", default=".run/serve/token")
    heldout.add_argument("--config", default="configs/local.yaml")
    heldout.add_argument("--results", required=True, help="jobs.evaluate's results.json")
    heldout.add_argument("--model", default="llm2clip", help="the model's row in it")
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args(argv)
    if args.what == "index":
        rows = bench_index(args.sizes, args.dim, args.ef)
    elif args.what == "load":
        rows = bench_load(args.url, Path(args.token_file).read_text().strip(), args.clients, args.seconds)
    else:
        rows = [bench_heldout(args.url, Path(args.token_file).read_text().strip(), args.config, args.results, args.model)]
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
