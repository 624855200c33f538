"""`jobs.ingest` on the embedded default and on user listings, against the real cluster and MLflow."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from mlflow.tracking import MlflowClient

from pipeline.store import Store
from tests.bad_images import EXPECTED, LIMITS, write_corpus
from tests.conftest import load_result, run_stage, write_config


@pytest.fixture(scope="module")
def embedded_run(tmp_path_factory, cluster, models):
    root = tmp_path_factory.mktemp("ingest")
    config = write_config(root / "c.yaml", root / "store", cluster)
    return root, config, run_stage("jobs.ingest", config, cluster)


def test_embedded_default_is_ingested(embedded_run):
    root, _, first = embedded_run
    manifest = Store(str(root / "store"), "manifest").read("embedded")
    photos = [m for m in manifest.column("metadata").to_pylist() if json.loads(m)["kind"] == "sample_photo"]
    scenes = [m for m in manifest.column("metadata").to_pylist() if json.loads(m)["kind"] == "synthetic_scene"]
    assert len(scenes) == 24 and len(photos) >= 4
    assert set(manifest.column("split").to_pylist()) <= {"train", "val", "test"}
    assert len(set(manifest.column("image_id").to_pylist())) == manifest.num_rows
    captions = Store(str(root / "store"), "captions")
    originals = captions.read("original")
    dense = captions.read("provided")
    assert set(dense.column("image_id").to_pylist()) == set(manifest.column("image_id").to_pylist())
    assert originals.num_rows >= 3 * 24  # short caption + 2 paraphrases per scene
    assert set(dense.column("source").to_pylist()) == {"dense"}
    # every image keeps its split across runs: it is derived from the image id
    assert first.added == manifest.num_rows and first.input_rows == first.added + first.skipped + first.rejected


def test_reingest_adds_nothing(embedded_run, cluster):
    root, config, _ = embedded_run
    stores = {n: Store(str(root / "store"), n) for n in ("manifest", "captions")}
    before = {n: len(s.commits(v)) for n, s in stores.items() for v in s.versions()}
    second = run_stage("jobs.ingest", config, cluster)
    assert second.added == 0 and second.captions_added == 0 and second.skipped == second.input_rows
    after = {n: len(s.commits(v)) for n, s in stores.items() for v in s.versions()}
    assert before == after  # no new commits, no duplicate rows


def test_mlflow_run_records_config_counts_and_lineage(embedded_run, cluster):
    _, _, first = embedded_run
    client = MlflowClient(cluster["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("llm2clip-tests")
    runs = client.search_runs([exp.experiment_id], "tags.`llm2clip.stage` = 'ingest'", order_by=["attributes.start_time ASC"])
    assert runs
    run = next(r for r in runs if r.info.run_id == first.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["added"] >= 28 and run.data.metrics["rejected"] == 0
    assert run.data.params["ingest.dataset"] == "embedded"
    assert run.data.tags["llm2clip.code.source_sha256"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "config")}
    assert {"config/config.yaml", "config/resolved.json"} <= artifacts


def test_bad_inputs_end_in_rejects_with_reasons(tmp_path, cluster, models):
    listing = write_corpus(tmp_path / "corpus")
    # the same good image listed twice: the second is a duplicate
    with open(listing, "a") as f:
        f.write(json.dumps({"image": "good.png", "captions": ["again"]}) + "\n")
    limits = {f"ingest.limits.{k}={v}" for k, v in LIMITS.items()}
    config = write_config(tmp_path / "c.yaml", tmp_path / "store", cluster)
    out = run_stage("jobs.ingest", config, cluster, "--set", f"ingest.source={listing}", "--set", "ingest.dataset=user",
                    *[a for x in sorted(limits) for a in ("--set", x)])
    rejects = Store(str(tmp_path / "store"), "rejects").read("ingest.user").to_pylist()
    by_file = {r["record_id"].rsplit("/", 1)[-1]: r["reason"] for r in rejects}
    expected_rejects = {n: r for n, r in EXPECTED.items() if r}
    assert {n: by_file.get(n) for n in expected_rejects} == expected_rejects
    assert sum(r["reason"] == "duplicate_image" for r in rejects) == 1
    assert all(r["detail"] for r in rejects)
    manifest = Store(str(tmp_path / "store"), "manifest").read("user")
    accepted = {n for n, r in EXPECTED.items() if r is None}
    assert {u.rsplit("/", 1)[-1] for u in manifest.column("uri").to_pylist()} == accepted
    modes = dict(zip([u.rsplit("/", 1)[-1] for u in manifest.column("uri").to_pylist()], manifest.column("mode").to_pylist()))
    assert modes["cmyk.jpg"] == "CMYK" and modes["palette.png"] == "P" and modes["gray16.png"].startswith("I")
    total = len(EXPECTED) + 1
    assert out.input_rows == total and out.added == len(accepted) and out.rejected == total - len(accepted)
    assert out.reject_reasons == dict(Counter(r["reason"] for r in rejects))


# ---------------------------------------------------------------- object storage (S3 protocol on loopback)
BUCKET = "ingest-tests"  # a bucket name of its own: filesystems are cached per bucket in a process


def _png(color: tuple[int, int, int], size: int = 16) -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (size, size), color).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def s3_runs(s3, cluster, models, tmp_path_factory):
    """`jobs.ingest` on sources in the bucket: the embedded default with storage_uri on S3 (twice),
    a listing (relative, absolute-URI and missing images), a prefix with sidecar captions, one
    image, a missing bucket and a missing key. One interpreter runs the job's `main` once per
    source (a fresh one costs ~15 s of imports each); its workers get the storage env from it."""
    import subprocess
    import sys

    from tests.conftest import REPO, job_env

    client = s3.client()
    s3.bucket(BUCKET)
    put = lambda key, body: client.put_object(Bucket=BUCKET, Key=key, Body=body)  # noqa: E731
    put("user/images/a.png", _png((200, 10, 10)))
    put("other/b.png", _png((10, 200, 10)))
    put("user/listing.jsonl", "".join(json.dumps(r) + "\n" for r in [
        {"image": "images/a.png", "captions": ["a red square"]},
        {"image": f"s3://{BUCKET}/other/b.png", "captions": ["a green square"]},
        {"image": "images/gone.png", "captions": ["lost"]},
    ]))
    put("folder/x.png", _png((10, 10, 200)))
    put("folder/x.txt", "a blue square\n\nblue again\n")
    put("folder/sub/y.png", _png((200, 200, 10)))
    put("one/z.png", _png((10, 200, 200)))
    put("one/z.txt", "a cyan square\n")

    root = tmp_path_factory.mktemp("ingest-s3")
    config = write_config(root / "c.yaml", root / "store", cluster)
    calls = {
        "embedded": ["--set", f"storage_uri=s3://{BUCKET}/storage"],
        "embedded_again": ["--set", f"storage_uri=s3://{BUCKET}/storage"],
        "listing": ["--set", f"ingest.source=s3://{BUCKET}/user/listing.jsonl", "--set", "ingest.dataset=s3listing"],
        "listing_again": ["--set", f"ingest.source=s3://{BUCKET}/user/listing.jsonl", "--set", "ingest.dataset=s3listing"],
        "prefix": ["--set", f"ingest.source=s3://{BUCKET}/folder", "--set", "ingest.dataset=s3prefix"],
        "image": ["--set", f"ingest.source=s3://{BUCKET}/one/z.png", "--set", "ingest.dataset=s3image"],
        "no_bucket": ["--set", "ingest.source=s3://no-such-bucket/listing.jsonl"],
        "no_key": ["--set", f"ingest.source=s3://{BUCKET}/user/nothing.jsonl"],
    }
    argv = {name: ["--config", str(config), "--summary-json", str(root / f"{name}.json"), *args] for name, args in calls.items()}
    runner = ("import json, sys\nfrom jobs.ingest import main\n"
              "for name, argv in json.loads(sys.argv[1]).items():\n"
              "    print(f'<<{name}', file=sys.stderr, flush=True)\n"
              "    print(f'>>{name} rc={main(argv)}', file=sys.stderr, flush=True)\n")
    out = subprocess.run([sys.executable, "-c", runner, json.dumps(argv)], cwd=REPO, env={**job_env(cluster), **s3.env},
                         capture_output=True, text=True, timeout=600)
    runs = {}
    for name in calls:
        start, end = out.stderr.find(f"<<{name}\n"), out.stderr.find(f">>{name} rc=")
        assert start >= 0 and end >= 0, out.stdout[-2000:] + out.stderr[-6000:]
        rc = int(out.stderr[end:].split("rc=", 1)[1].split()[0])
        summary = root / f"{name}.json"
        runs[name] = (rc, out.stderr[start:end], load_result("jobs.ingest", summary) if summary.exists() else None)
    return root, runs


def test_s3_embedded_default_renders_to_storage(s3_runs, s3):
    root, runs = s3_runs
    (rc, err, first), (rc2, _, again) = runs["embedded"], runs["embedded_again"]
    assert rc == 0 and rc2 == 0, err[-3000:]
    assert first.listing.startswith(f"s3://{BUCKET}/storage/datasets/embedded-") and first.listing.endswith("/listing.jsonl")
    assert first.added == first.input_rows >= 28 and first.opened == first.input_rows
    manifest = Store(str(root / "store"), "manifest").read("embedded")
    assert all(u.startswith(f"s3://{BUCKET}/storage/datasets/embedded-") for u in manifest.column("uri").to_pylist())
    keys = s3.keys(BUCKET, "storage/datasets/")
    assert sum(k.endswith(".png") for k in keys) == first.input_rows
    # the second run reuses the rendered dataset and opens no image
    assert again.listing == first.listing and again.added == 0 and again.opened == 0 and again.skipped == again.input_rows


def test_s3_listing(s3_runs):
    root, runs = s3_runs
    rc, err, out = runs["listing"]
    assert rc == 0, err[-3000:]
    assert (out.input_rows, out.added, out.rejected, out.reject_reasons) == (3, 2, 1, {"missing_file": 1})
    manifest = Store(str(root / "store"), "manifest").read("s3listing").to_pylist()
    assert {m["uri"]: m["captions"] for m in manifest} == {f"s3://{BUCKET}/user/images/a.png": ["a red square"],
                                                           f"s3://{BUCKET}/other/b.png": ["a green square"]}
    rejects = Store(str(root / "store"), "rejects").read("ingest.s3listing").to_pylist()
    assert [(r["record_id"], r["reason"]) for r in rejects] == [(f"s3://{BUCKET}/user/images/gone.png", "missing_file")]
    rc, err, again = runs["listing_again"]  # identity (uri, size, S3 LastModified): nothing is opened
    assert rc == 0 and (again.added, again.skipped, again.rejected, again.opened, again.unchanged) == (0, 2, 1, 0, 2), err[-3000:]


def test_s3_prefix_and_single_image(s3_runs):
    root, runs = s3_runs
    rc, err, out = runs["prefix"]
    assert rc == 0 and out.added == out.input_rows == 2, err[-3000:]
    manifest = Store(str(root / "store"), "manifest").read("s3prefix").to_pylist()
    assert {m["uri"]: m["captions"] for m in manifest} == {f"s3://{BUCKET}/folder/x.png": ["a blue square", "blue again"],
                                                           f"s3://{BUCKET}/folder/sub/y.png": []}
    rc, err, out = runs["image"]
    assert rc == 0 and out.added == out.input_rows == 1, err[-3000:]
    [row] = Store(str(root / "store"), "manifest").read("s3image").to_pylist()
    assert row["uri"] == f"s3://{BUCKET}/one/z.png" and row["captions"] == ["a cyan square"]


def test_s3_missing_bucket_or_key_is_one_line(s3_runs):
    _, runs = s3_runs
    for name, names in (("no_bucket", "bucket s3://no-such-bucket does not exist"),
                        ("no_key", f"s3://{BUCKET}/user/nothing.jsonl does not exist")):
        rc, err, _ = runs[name]
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert rc == 2 and len(errors) == 1 and names in errors[0], err[-3000:]
        assert "Traceback" not in err


# ---------------------------------------------------------------- refreshes open only what is new
def test_refresh_opens_only_new_rows(tmp_path, ray_session):
    """Rows are known by (uri, size, mtime): a re-ingest of the same listing opens no image (its
    images' bytes are replaced by garbage of the same size and mtime, and none is rejected), a
    grown listing opens only its new rows, an earlier reject is not opened again."""
    import os

    from pipeline.config import IngestConfig
    from pipeline.stages.listing_ingest import ingest_listing

    images = tmp_path / "images"
    images.mkdir()
    rows = []
    for i in range(8):
        (images / f"{i}.png").write_bytes(_png((i * 30, 0, 0)))
        rows.append({"image": f"images/{i}.png", "captions": [f"image {i}"]})
    (images / "text.png").write_bytes(b"not an image at all")
    rows += [{"image": "images/text.png", "captions": ["bad"]}, {"image": "images/gone.png", "captions": ["missing"]}]
    listing = tmp_path / "listing.jsonl"
    listing.write_text("".join(json.dumps(r) + "\n" for r in rows))
    icfg = IngestConfig(source=str(listing), dataset="refresh", batch_size=4)
    store = str(tmp_path / "store")

    first = ingest_listing(store, icfg, str(listing))
    assert (first.added, first.rejected, first.opened, first.unchanged) == (8, 2, 9, 0)  # the missing file is not opened
    for path in images.iterdir():  # same size, same mtime, other bytes: any open would reject it
        stat = path.stat()
        path.write_bytes(b"\0" * stat.st_size)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    again = ingest_listing(store, icfg, str(listing))
    assert (again.added, again.skipped, again.rejected, again.opened, again.unchanged) == (0, 8, 2, 0, 9)
    assert again.reject_reasons == {"not_an_image": 1, "missing_file": 1}
    assert again.commits["manifest"] is None and again.commits["sources"] is None

    for i in range(8, 11):
        (images / f"{i}.png").write_bytes(_png((0, i * 20, 0)))
        rows.append({"image": f"images/{i}.png", "captions": [f"image {i}"]})
    listing.write_text("".join(json.dumps(r) + "\n" for r in rows))
    grown = ingest_listing(store, icfg, str(listing))
    assert (grown.input_rows, grown.added, grown.skipped, grown.rejected, grown.opened) == (13, 3, 8, 2, 3)
    assert Store(store, "manifest").num_rows("refresh") == 11
    # a file that changed (new mtime) is opened again: the garbage written above is now a reject
    changed = images / "0.png"
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    last = ingest_listing(store, icfg, str(listing))
    assert (last.opened, last.skipped, last.rejected) == (1, 10, 3) and last.reject_reasons["not_an_image"] == 2
