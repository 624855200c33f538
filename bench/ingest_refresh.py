"""Benchmark: incremental ingest at scale, a refresh that finds nothing new and one that finds 1,000 new rows.

Writes N tiny distinct PNGs (8-32 px, each its own colour) and a `.jsonl` listing of them,
ingests the listing once (timed), then refreshes:

1. nothing new: every image is first overwritten with zero bytes of the same size and its
   mtime put back, so an image that the refresh opened would be a `not_an_image` reject. The
   refresh must report 0 opened (rows sent to the check tasks) and 0 rejected, every row
   skipped, in under 60 s;
2. the listing grown by `--new` images: only those are opened (and added), nothing else is
   rejected.

Each ingest is `run_ingest` (the job's stage function) on a private local Ray, MLflow off; the
timings are its wall time (Ray already started). `--s3 N` repeats the three steps with N
images in a bucket of moto's S3 server on loopback (their size and mtime come from S3
listings, their bytes through the S3 API).

    python -m bench.ingest_refresh [--images 100000] [--new 1000] [--s3 0]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

from pipeline.config import load_config
from pipeline.stages import runtime
from pipeline.stages.ingest import run_ingest
from pipeline.stages.tracking import Tracker

REFRESH_TARGET_S = 60.0


def tiny_png(i: int) -> bytes:
    """A distinct 8-32 px RGB PNG for index i (its colour encodes i), written without PIL."""
    side = 8 + i % 25
    row = b"\x00" + bytes((i & 255, (i >> 8) & 255, (i >> 16) & 255)) * side
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))  # noqa: E731
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(row * side, 1)) + chunk(b"IEND", b"")


def listing_rows(start: int, stop: int) -> str:
    return "".join(json.dumps({"image": f"images/{i:07d}.png", "captions": [f"tiny image {i}"]}) + "\n" for i in range(start, stop))


def write_local(root: Path, start: int, stop: int) -> None:
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    for i in range(start, stop):
        (images / f"{i:07d}.png").write_bytes(tiny_png(i))
    with open(root / "listing.jsonl", "a") as f:
        f.write(listing_rows(start, stop))


def blank_local(root: Path) -> None:
    """Every image's bytes replaced by zeros; same size, same mtime."""
    for path in (root / "images").iterdir():
        stat = path.stat()
        path.write_bytes(b"\0" * stat.st_size)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def ingest(base: list[str], source: str) -> tuple[float, object]:
    cfg = load_config("configs/local.yaml", [*base, f"ingest.source={source}"])
    start = time.perf_counter()
    result = run_ingest(cfg, Tracker(None, None))
    return time.perf_counter() - start, result


def figures(seconds: float, r) -> dict:
    return {"seconds": round(seconds, 1), "input_rows": r.input_rows, "added": r.added, "skipped": r.skipped,
            "rejected": r.rejected, "opened": r.opened, "unchanged": r.unchanged}


def run_local(base: list[str], root: Path, n: int, new: int) -> dict:
    start = time.perf_counter()
    write_local(root, 0, n)
    out = {"write_images_s": round(time.perf_counter() - start, 1)}
    listing = str(root / "listing.jsonl")
    out["first"] = figures(*ingest(base, listing))
    blank_local(root)
    out["refresh_nothing_new"] = figures(*ingest(base, listing))
    write_local(root, n, n + new)
    out["refresh_grown"] = figures(*ingest(base, listing))
    return out


def start_moto() -> subprocess.Popen:
    """moto's S3 server on a free loopback port; its settings go into this process's environment
    before Ray starts, so the job hands them to its workers (runtime_env)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("moto_server did not start") from None
            time.sleep(0.2)


def stop_moto(server: subprocess.Popen) -> None:
    os.killpg(server.pid, 15)
    server.wait(timeout=30)


def run_s3(base: list[str], n: int, new: int) -> dict:
    """The same steps with the images and the listing in a bucket of the moto server (no blanking:
    a rewritten object gets a new LastModified; step 1 is proved by `opened`)."""
    from concurrent.futures import ThreadPoolExecutor

    import boto3

    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name="us-east-1")
    client.create_bucket(Bucket="bench")

    def put(start: int, stop: int) -> float:
        began = time.perf_counter()
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda i: client.put_object(Bucket="bench", Key=f"data/images/{i:07d}.png", Body=tiny_png(i)), range(start, stop)))
        client.put_object(Bucket="bench", Key="data/listing.jsonl", Body=listing_rows(0, stop))
        return round(time.perf_counter() - began, 1)

    source = "s3://bench/data/listing.jsonl"
    out = {"upload_s": put(0, n), "first": figures(*ingest(base, source))}
    out["refresh_nothing_new"] = figures(*ingest(base, source))
    put(n, n + new)
    out["refresh_grown"] = figures(*ingest(base, source))
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--new", type=int, default=1_000)
    parser.add_argument("--s3", type=int, default=0, metavar="N", help="also run the steps with N images on a moto S3 server")
    parser.add_argument("--batch-size", type=int, default=512)
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="bench-ingest-refresh-"))
    server = start_moto() if args.s3 else None
    try:
        base = [f"run_dir={tmp}/run", f"store.uri={tmp}/store", "ray.address=local", "mlflow.enabled=false",
                "ingest.dataset=bench", f"ingest.batch_size={args.batch_size}"]
        cfg = load_config("configs/local.yaml", base)
        runtime.connect(cfg.ray, cfg.run_dir)
        report = {"benchmark": "ingest_refresh", "images": args.images, "new": args.new, "batch_size": args.batch_size}
        if args.images:
            local = report["local"] = run_local(base, tmp / "data", args.images, args.new)
            nothing, grown = local["refresh_nothing_new"], local["refresh_grown"]
            report["checks"] = {
                "refresh_under_60s": nothing["seconds"] < REFRESH_TARGET_S,
                "refresh_opened_none": nothing["opened"] == 0 and nothing["rejected"] == 0 and nothing["skipped"] == args.images,
                "grown_opened_only_new": grown["opened"] == args.new and grown["added"] == args.new and grown["rejected"] == 0,
            }
        if args.s3:
            s3 = report["s3"] = {"images": args.s3, **run_s3([*base[:1], f"store.uri={tmp}/store-s3", *base[2:]], args.s3, args.new)}
            report.setdefault("checks", {}).update(
                s3_refresh_opened_none=s3["refresh_nothing_new"]["opened"] == 0 and s3["refresh_nothing_new"]["skipped"] == args.s3,
                s3_grown_opened_only_new=s3["refresh_grown"]["opened"] == args.new == s3["refresh_grown"]["added"])
    finally:
        if server is not None:
            stop_moto(server)
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
