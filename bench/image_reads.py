"""Benchmark: reading ingested images from their shard by byte range vs from an image cache.

WebDataset ingest keeps each image in its shard (a member reference: shard, offset, size). The
alternative is a content-addressed image cache: every image copied once more, to
`{cache}/{sha256}`, and read from there. This measures what later stages pay per image for each,
through the function they call (`pipeline.images.read_uri`), in the order they read: shuffled
(train-clip's epochs) and in shard order (recaption, evaluate, export). Local disk and an S3
bucket on moto's server (loopback), `--images` 32 px PNGs, `--per-shard` a shard.

    python -m bench.image_reads [--images 2000] [--per-shard 500]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

from bench.ingest_refresh import start_moto, stop_moto
from bench.scale import png, write_shards
from pipeline import shards, uri
from pipeline.images import read_uri


def refs_of(pattern: str) -> list[tuple[str, bytes]]:
    """(member reference, bytes) of every image of the shards."""
    out = []
    for shard in shards.shard_locations(pattern):
        read = shards.read_shard(shard, lambda data: data)
        out += [(str(s.image_ref), s.image) for s in read.samples.values() if s.image_ref]
    return out


def timed(locations: list[str]) -> float:
    start = time.perf_counter()
    for location in locations:
        read_uri(location)
    return 1000 * (time.perf_counter() - start) / len(locations)


def measure(refs: list[tuple[str, bytes]], cache: str) -> dict:
    """ms per image, byte range vs cache, shuffled and in order; and the cache's extra bytes."""
    cached = []
    for _, data in refs:
        location = uri.join(cache, hashlib.sha256(data).hexdigest())
        uri.write_bytes(location, data)
        cached.append(location)
    members = [r for r, _ in refs]
    order = list(range(len(refs)))
    random.Random(0).shuffle(order)
    return {"byte_range_in_order_ms": round(timed(members), 3), "cache_in_order_ms": round(timed(cached), 3),
            "byte_range_shuffled_ms": round(timed([members[i] for i in order]), 3),
            "cache_shuffled_ms": round(timed([cached[i] for i in order]), 3),
            "cache_extra_bytes": sum(len(d) for _, d in refs)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--per-shard", type=int, default=500)
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="bench-image-reads-"))
    server = start_moto()
    try:
        pattern = write_shards(tmp / "shards", args.images, args.per_shard)
        local = refs_of(pattern)
        report = {"benchmark": "image_reads", "images": args.images, "per_shard": args.per_shard,
                  "local": measure(local, str(tmp / "cache"))}
        import boto3

        client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name="us-east-1")
        client.create_bucket(Bucket="bench")
        for path in sorted((tmp / "shards").glob("*.tar")):
            client.put_object(Bucket="bench", Key=f"shards/{path.name}", Body=path.read_bytes())
        remote = refs_of(f"s3://bench/shards/{{00000..{len(list((tmp / 'shards').glob('*.tar'))) - 1:05d}}}.tar")
        report["s3"] = measure(remote, "s3://bench/cache")
        assert all(png(0)[:8] == d[:8] for _, d in local[:1])  # PNGs, as written
    finally:
        stop_moto(server)
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
