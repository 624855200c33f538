"""jobs.serve's costs: how long the image index takes to answer, exact and approximate, at 10k
and 100k vectors (synthetic), and what a running service sustains under concurrent clients.

    python -m bench.serve index [--sizes 10000 100000] [--dim 1280]
    python -m bench.serve load --url http://127.0.0.1:8000/ --token-file .run/serve/token [--clients 4 --seconds 30]

index: unit random vectors with clustered structure (so neighbours are not all equally far);
one query at a time (what a request does), the median over 200 queries; the HNSW graph's
recall@10 against exact search, and its build time. Exact search is the baseline of the run.
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


def bench_index(sizes: list[int], dim: int, queries: int = 200, k: int = 10) -> list[dict]:
    from pipeline.search_index import VectorIndex

    rng = np.random.default_rng(0)
    rows = []
    for n in sizes:
        data = _vectors(n, dim, rng)
        probes = _vectors(queries, dim, rng)
        exact = VectorIndex(data)
        started = time.perf_counter()
        approx = VectorIndex(data, approximate_from=1)
        build = time.perf_counter() - started
        row = {"vectors": n, "dim": dim, "hnsw_build_s": round(build, 2)}
        truth = []
        for name, index in (("exact", exact), ("hnsw", approx)):
            times, found = [], []
            for q in probes:
                t = time.perf_counter()
                hits = index.search(q, k)[0]
                times.append(time.perf_counter() - t)
                found.append(set(hits.rows.tolist()))
            if name == "exact":
                truth = found
            row[f"{name}_ms_p50"] = round(1000 * statistics.median(times), 3)
            row[f"{name}_ms_p99"] = round(1000 * float(np.quantile(times, 0.99)), 3)
        row["hnsw_recall_at_10"] = round(float(np.mean([len(a & b) / k for a, b in zip(found, truth)])), 4)
        row["exact_over_hnsw"] = round(row["exact_ms_p50"] / row["hnsw_ms_p50"], 1)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    index = sub.add_parser("index")
    index.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    index.add_argument("--dim", type=int, default=1280, help="the authors' joint space (EVA02-L/14 + adapter) is 1280-d")
    load = sub.add_parser("load")
    load.add_argument("--url", default="http://127.0.0.1:8000/")
    load.add_argument("--token-file", default=".run/serve/token")
    load.add_argument("--clients", type=int, default=4)
    load.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args(argv)
    if args.what == "index":
        rows = bench_index(args.sizes, args.dim)
    else:
        rows = bench_load(args.url, Path(args.token_file).read_text().strip(), args.clients, args.seconds)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
