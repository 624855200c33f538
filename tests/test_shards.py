"""Ingest from WebDataset shards: brace patterns, img2dataset folders, members out of order,
damaged members, and a killed ingest that keeps its committed shards (real Ray, real Parquet,
S3 on the rig's loopback server)."""

from __future__ import annotations

import hashlib
import io
import json
import random
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import shards
from pipeline.config import IngestConfig
from pipeline.images import read_ingested_bytes
from pipeline.store import Store
from tests.conftest import crash_job, run_stage_here, write_config


def _jpeg(seed: int, size: int = 24) -> bytes:
    rng = random.Random(seed)
    image = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
    image.putpixel((seed % size, 0), (seed % 256, 7, 9))  # distinct bytes per seed
    out = io.BytesIO()
    image.save(out, format="JPEG")
    return out.getvalue()


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: Path, members: list[tuple[str, bytes]]) -> bytes:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            _member(tar, name, data)
    return path.read_bytes()


def samples(first: int, n: int, prefix: str = "") -> list[list[tuple[str, bytes]]]:
    """n samples as WebDataset members: `{key}.jpg`, `{key}.txt`, `{key}.json` (img2dataset's three)."""
    out = []
    for i in range(first, first + n):
        key = f"{prefix}{i:09d}"
        meta = {"key": key, "caption": f"photo number {i}", "url": f"http://example.com/{i}.jpg", "status": "success"}
        out.append([(f"{key}.jpg", _jpeg(i)), (f"{key}.txt", f"photo number {i}".encode()), (f"{key}.json", json.dumps(meta).encode())])
    return out


@pytest.fixture(scope="module")
def damaged_shards(tmp_path_factory, ray_session):
    """Three shards ingested through a brace pattern: members shuffled across keys, a corrupt
    image member, a sample without an image, a header that fails its checksum, a shard cut short."""
    from pipeline.stages.shard_ingest import ingest_shards

    root = tmp_path_factory.mktemp("shards")
    folder = root / "cc"
    folder.mkdir()
    first = [m for s in samples(0, 6) for m in s]
    random.Random(0).shuffle(first)  # .txt before .jpg, keys interleaved: grouped by key, not by neighbour
    first += [("000000900.jpg", b"\xff\xd8\xff\xe0 not really a jpeg"), ("000000900.txt", b"broken"), ("000000901.txt", b"no image")]
    write_shard(folder / "00000.tar", first)
    second = write_shard(folder / "00001.tar", [m for s in samples(10, 4) for m in s])
    # damage the header of the second sample's image: its checksum fails, the scan resyncs after it
    tar = tarfile.open(folder / "00001.tar")
    victim = next(m for m in tar.getmembers() if m.name == "000000011.jpg")
    broken = bytearray(second)
    broken[victim.offset:victim.offset + 4] = b"\x00zz\x01"
    (folder / "00001.tar").write_bytes(bytes(broken))
    third = write_shard(folder / "00002.tar", [m for s in samples(20, 4) for m in s])
    cut = tarfile.open(folder / "00002.tar")
    last_image = [m for m in cut.getmembers() if m.name.endswith(".jpg")][-1]
    (folder / "00002.tar").write_bytes(third[: last_image.offset_data + 100])  # ends inside the last image
    icfg = IngestConfig(source=f"{folder}/{{00000..00002}}.tar", dataset="cc", commit_seconds=0)
    store = str(root / "store")
    result = ingest_shards(store, icfg, icfg.source)
    return root, store, icfg, result


def test_brace_pattern_reads_every_shard_with_members_out_of_order(damaged_shards):
    _, store, _, result = damaged_shards
    manifest = Store(store, "manifest").read("cc")
    # shard 0: 6 good; shard 1: 3 good (sample 11's image header is damaged); shard 2: 3 good (23 is cut)
    assert result.added == manifest.num_rows == 12
    assert result.input_rows == result.added + result.skipped + result.rejected
    for row in manifest.to_pylist():
        meta = json.loads(row["metadata"])
        i = int(meta["key"])
        assert row["captions"] == [f"photo number {i}"]  # .txt and the .json's caption: one caption, not two
        ref = shards.parse_member(row["uri"])
        assert ref is not None and ref.member == f"{meta['key']}.jpg" and ref.shard == meta["shard"]
        data, reason, _ = read_ingested_bytes(row["uri"], row["sha256"], 1 << 20)  # a byte-range read of the shard
        assert reason == "" and data == _jpeg(i)
        assert row["sha256"] == hashlib.sha256(data).hexdigest() and row["image_id"] == row["sha256"][:16]


def test_damaged_members_are_rejects_and_the_rest_goes_in(damaged_shards):
    _, store, _, result = damaged_shards
    rejects = Store(store, "rejects").read("ingest.cc").to_pylist()
    by_reason: dict[str, list[str]] = {}
    for r in rejects:
        by_reason.setdefault(r["reason"], []).append(r["record_id"])
    assert result.reject_reasons == {k: len(v) for k, v in by_reason.items()}
    assert [shards.parse_member(u).member for u in by_reason["not_an_image"]] == ["000000900.jpg"]
    assert sorted(by_reason["no_image_member"]) == sorted([shards.sample_uri(f"{Path(store).parent}/cc/00000.tar", "000000901"),
                                                          shards.sample_uri(f"{Path(store).parent}/cc/00001.tar", "000000011")])
    # the damaged header's bytes are one region, the cut member one reject: nothing silently lost
    truncated = by_reason["truncated_or_corrupt"]
    assert len(truncated) == 2 and any("00001.tar#offset=" in u for u in truncated) and any("00002.tar#key=000000023" in u for u in truncated)


def test_reingest_skips_committed_shards_unopened(damaged_shards):
    from pipeline.stages.shard_ingest import ingest_shards

    _, store, icfg, first = damaged_shards
    again = ingest_shards(store, icfg, icfg.source)
    assert (again.shards_skipped, again.opened, again.added) == (3, 0, 0)
    assert (again.input_rows, again.skipped, again.rejected) == (first.input_rows, first.added, first.rejected)
    assert again.reject_reasons == first.reject_reasons


def test_img2dataset_folder_uses_its_parquet(tmp_path, ray_session):
    """img2dataset's layout: a failed download is a reject with its error, a success the shard
    lacks is missing_from_shard, and the parquet's caption fills in for a sample without one."""
    from pipeline.stages.shard_ingest import ingest_shards

    folder = tmp_path / "out"
    folder.mkdir()
    members = [m for s in samples(0, 3) for m in s if not (m[0].startswith("000000002") and m[0][-4:] in (".txt", "json"))]
    write_shard(folder / "00000.tar", members)
    pq.write_table(pa.table({
        "key": ["000000000", "000000001", "000000002", "000000003", "000000004"],
        "caption": ["photo number 0", "photo number 1", "a caption only the parquet has", "lost", "never fetched"],
        "url": [f"http://example.com/{i}.jpg" for i in range(5)],
        "status": ["success", "success", "success", "success", "failed_to_download"],
        "error_message": [None, None, None, None, "HTTP Error 404: Not Found"],
    }), folder / "00000.parquet")
    (folder / "00000_stats.json").write_text(json.dumps({"count": 5, "successes": 4}))
    store = str(tmp_path / "store")
    result = ingest_shards(store, IngestConfig(source=str(folder), dataset="i2d"), str(folder))
    assert (result.input_rows, result.added, result.rejected) == (5, 3, 2)
    assert result.reject_reasons == {"missing_from_shard": 1, "download_failed": 1}
    rejects = {r["reason"]: r for r in Store(store, "rejects").read("ingest.i2d").to_pylist()}
    assert rejects["download_failed"]["detail"] == "HTTP Error 404: Not Found"
    captions = {json.loads(r["metadata"])["key"]: r["captions"] for r in Store(store, "manifest").read("i2d").to_pylist()}
    assert captions["000000002"] == ["a caption only the parquet has"]


def test_killed_shard_ingest_keeps_committed_shards(tmp_path, s3, cluster, models, ray_session):
    """`jobs.ingest` on shards in the bucket (a brace pattern), killed after its first shard
    commit: the re-run skips that shard unopened and reads the others; nothing is duplicated."""
    client = s3.client()
    s3.bucket("shards")
    for i in range(3):
        body = write_shard(tmp_path / f"{i}.tar", [m for s in samples(i * 5, 5) for m in s])
        client.put_object(Bucket="shards", Key=f"web/{i:05d}.tar", Body=body)
    config = write_config(tmp_path / "c.yaml", tmp_path / "store", cluster,
                          ingest={"source": "s3://shards/web/{00000..00002}.tar", "dataset": "web", "commit_seconds": 0, "concurrency": 1})
    crash_job("jobs.ingest", config, cluster, ["ingest.shards_committed"], tmp_path / "fired")
    kept = Store(str(tmp_path / "store"), "manifest").num_rows("web")
    assert kept == 5  # the first shard, committed whole
    rerun = run_stage_here("jobs.ingest", config, cluster)
    assert (rerun.shards, rerun.shards_skipped, rerun.opened, rerun.added, rerun.skipped) == (3, 1, 10, 10, 5)
    manifest = Store(str(tmp_path / "store"), "manifest").read("web")
    assert manifest.num_rows == 15 and len(set(manifest.column("image_id").to_pylist())) == 15
    assert all(u.startswith("s3://shards/web/") and "#member=" in u for u in manifest.column("uri").to_pylist())


def test_a_shard_is_known_only_when_every_sample_holds_under_these_limits():
    """A shard counts as read when each of its samples has a `sources` row at the shard's current
    size and mtime that holds under the current image limits; a reject decided under other limits
    (or a changed shard) sends it to be read again."""
    from pipeline.stages.shard_ingest import _known_shards

    stats = pa.table({"uri": ["/a.tar", "/b.tar", "/c.tar"], "size": [10, 20, 30], "mtime_ns": [1, 2, 3], "found": [True, True, True]})
    member = lambda shard, name: str(shards.MemberRef(shard, name, 512, 9))  # noqa: E731
    recorded = pa.table({
        "uri": [member("/a.tar", "x.png"), member("/a.tar", "y.png"), member("/b.tar", "z.png"), shards.sample_uri("/b.tar", "q"),
                member("/c.tar", "w.png")],
        "size": [10, 10, 20, 20, 31], "mtime_ns": [1, 1, 2, 2, 3],  # c.tar has grown since
        "checked_with": ["", "NEW", "", "OLD", ""], "outcome": ["accepted", "rejected", "accepted", "rejected", "accepted"],
        "image_id": ["i1", None, "i2", None, "i3"], "reason": [None, "too_small", None, "no_image_member", None]})
    known, todo = _known_shards(stats, recorded, pa.array(["i1", "i2", "i3"]), "NEW")
    assert {s: (c.rows, c.accepted, c.reasons) for s, c in known.items()} == {"/a.tar": (2, 1, {"too_small": 1})}
    assert todo.column("shard").to_pylist() == ["/b.tar", "/c.tar"]


def test_a_folder_of_images_with_a_stray_archive_stays_a_folder_of_images(tmp_path):
    (tmp_path / "00000.tar").write_bytes(b"")
    (tmp_path / "00000.parquet").write_bytes(b"")
    assert shards.is_shard_source(str(tmp_path)) and shards.is_shard_source(f"{tmp_path}/{{00000..00000}}.tar")
    (tmp_path / "photo.jpg").write_bytes(_jpeg(1))
    assert not shards.is_shard_source(str(tmp_path))
