"""`jobs.export`: the train-clip store (`clip_store`: 60 scenes + 10 photos, embedded by the tiny
Llama) as WebDataset shards, read back with `webdataset` as open_clip reads them; one image's
bytes changed after ingest; a re-run does nothing; an interrupted export is redone cleanly."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import webdataset as wds
from braceexpand import braceexpand
from mlflow.tracking import MlflowClient
from PIL import Image

from pipeline.config import load_config
from pipeline.stages.export import plan_export
from pipeline.store import Store
from pipeline.webdataset_io import Sample, image_member, shard_name, write_tar
from tests.conftest import changed_since_ingest, CLIP_MODELS, run_stage_here, write_config

PER_SHARD = 16  # 70 images: 5 shards


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.tar"))}


@pytest.fixture(scope="module")
def exported(clip_store, cluster, tmp_path_factory):
    """The export of the whole manifest with the tiny Llama's embeddings (float16 .npy), one training image changed meanwhile."""
    store = str(clip_store / "store")
    embeddings = Store(store, "embeddings")
    version = next(v for v in embeddings.versions() if any("tiny-llama" in (c.lineage.encoder or "") for c in embeddings.commits(v)))
    out = tmp_path_factory.mktemp("export") / "shards"
    config = write_config(out.parent / "export.yaml", clip_store / "store", cluster, models=CLIP_MODELS,
                          export={"uri": str(out), "encoder_version": version, "samples_per_shard": PER_SHARD})
    manifest = {r["image_id"]: r for r in Store(store, "manifest").read("embedded").to_pylist()}
    captions = {v: Store(store, "captions").read(v).to_pylist() for v in ("original", "provided")}
    vectors = Store(store, "embeddings").read(version)
    by_caption = dict(zip(vectors.column("caption_id").to_pylist(), np.stack(vectors.column("embedding").to_numpy(zero_copy_only=False))))
    embedded = {c["image_id"] for rows in captions.values() for c in rows if c["caption_id"] in by_caption}
    victim = next(i for i, r in manifest.items() if r["split"] == "train" and i in embedded)
    with changed_since_ingest(manifest[victim]["uri"]):
        result = run_stage_here("jobs.export", config, cluster)
    return dict(config=config, out=out, result=result, manifest=manifest, captions=captions, vectors=by_caption, victim=victim,
                unembedded=set(manifest) - embedded, digests=_digests(out), version=version)


def test_shards_read_back_as_open_clip_reads_them(exported, cluster):
    e, result, manifest = exported, exported["result"], exported["manifest"]
    urls = list(braceexpand(result.urls))
    assert len(urls) == result.shards == -(-len(manifest) // PER_SHARD) >= 2
    assert [Path(u).name for u in urls] == sorted(p.name for p in e["out"].glob("*.tar")) == [shard_name(i, 5) for i in range(5)]
    # open_clip: decode, the image under jpg/png/jpeg/webp, the caption under txt; with our json and npy
    loader = wds.WebDataset(urls, shardshuffle=False).decode("pilrgb").to_tuple("__key__", "jpg;png;jpeg;webp", "txt", "json", "npy")
    keys = []
    for key, image, text, meta, npy in loader:
        row = manifest[key]
        keys.append(key)
        assert isinstance(image, Image.Image) and image.size == (row["width"], row["height"])
        assert text == row["captions"][0]  # the listing's first alt-text
        assert meta["image_id"] == key and meta["split"] == row["split"] and meta["sha256"] == row["sha256"]
        wanted = [[c["caption_id"] for c in e["captions"][v] if c["image_id"] == key] for v in ("original", "provided")]
        got = [c["caption_id"] for c in meta["captions"]]
        assert sorted(got[: len(wanted[0])]) == sorted(wanted[0]) and sorted(got[len(wanted[0]):]) == sorted(wanted[1])
        assert meta["captions"][0]["text"] == text and meta["encoder_version"] == e["version"]
        assert npy.dtype == np.float16 and npy.shape == (len(got), len(next(iter(e["vectors"].values()))))
        np.testing.assert_array_equal(npy, np.stack([e["vectors"][c] for c in got]).astype(np.float16))  # row i: caption i
    assert len(keys) == len(set(keys)) == result.samples
    assert set(keys) == set(manifest) - {e["victim"]} - e["unembedded"]
    rejected = {"changed_since_ingest": 1} | ({"no_caption_embedding": len(e["unembedded"])} if e["unembedded"] else {})
    assert result.rejected == rejected and result.images == len(manifest) == result.samples + sum(rejected.values())
    sizes = json.loads((e["out"] / "sizes.json").read_text())  # what open_clip's get_dataset_size reads
    assert sum(sizes.values()) == result.samples and sorted(sizes) == [Path(u).name for u in urls]
    rejects = Store(load_config(e["config"]).store.uri, "rejects").read("export.embedded").to_pylist()
    assert {r["record_id"]: r["reason"] for r in rejects}[e["victim"]] == "changed_since_ingest"
    run = MlflowClient(cluster["MLFLOW_TRACKING_URI"]).get_run(result.mlflow_run_id)
    assert run.data.tags["llm2clip.stage"] == "export" and run.data.metrics["samples"] == result.samples


def test_a_rerun_of_a_finished_export_is_a_no_op(exported, cluster):
    e = exported
    assert plan_export(load_config(e["config"])).exists
    mtimes = {p.name: p.stat().st_mtime_ns for p in e["out"].iterdir()}
    again = run_stage_here("jobs.export", e["config"], cluster)
    assert again.already_written and again.samples == e["result"].samples and again.urls == e["result"].urls
    assert {p.name: p.stat().st_mtime_ns for p in e["out"].iterdir()} == mtimes  # nothing rewritten


def test_an_interrupted_export_is_redone_cleanly(exported, cluster):
    """A kill before `_index.json` leaves shards, a half one, a temporary and shards of a bigger
    earlier export: the next run clears them and writes the same shards (the victim restored now)."""
    e, out = exported, exported["out"]
    (out / "_index.json").unlink()
    (out / "00000.tar").write_bytes((out / "00000.tar").read_bytes()[:5000])
    (out / "00042.tar").write_bytes(b"stale")
    (out / ".tmp-00001.tar").write_bytes(b"half")
    assert not plan_export(load_config(e["config"])).exists
    redone = run_stage_here("jobs.export", e["config"], cluster)
    assert not redone.already_written and redone.samples == e["result"].samples + 1 and redone.rejected.get("changed_since_ingest") is None
    digests = _digests(out)
    assert sorted(p.name for p in out.iterdir()) == sorted([*e["digests"], "sizes.json", "_index.json"])
    changed = {name for name in digests if digests[name] != e["digests"][name]}
    victim_shard = next(Path(u).name for u in braceexpand(redone.urls)
                        if any(s["__key__"] == e["victim"] for s in wds.WebDataset(u, shardshuffle=False)))
    assert changed == {victim_shard}  # the same inputs write the same bytes; only the restored image's shard differs


def test_image_members_are_what_open_clip_reads():
    """JPEG, PNG and WebP go in as ingested; other formats as a lossless PNG of the image."""
    def encoded(fmt: str, mode: str = "RGB") -> bytes:
        buf = io.BytesIO()
        Image.new(mode, (9, 7), 128).save(buf, format=fmt)
        return buf.getvalue()

    for fmt, ext in (("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp")):
        assert image_member(encoded(fmt)) == (ext, encoded(fmt), "")
    for fmt, mode in (("GIF", "P"), ("BMP", "RGB"), ("TIFF", "CMYK")):
        ext, data, converted = image_member(encoded(fmt, mode))
        assert (ext, converted) == ("png", fmt) and Image.open(io.BytesIO(data)).size == (9, 7)
    with pytest.raises(ValueError):
        Sample("a.b", {})


def test_write_tar_is_read_by_webdataset(tmp_path):
    path = tmp_path / "00000.tar"
    assert write_tar(str(path), (Sample(f"k{i}", {"txt": f"caption {i}".encode()}) for i in range(3)))[0] == 3
    assert [(s["__key__"], s["txt"]) for s in wds.WebDataset(str(path), shardshuffle=False).decode()] == [
        (f"k{i}", f"caption {i}") for i in range(3)]
    assert not list(tmp_path.glob(".tmp-*"))


@pytest.mark.parametrize("stored", [pa.float32(), pa.float16()])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_embeddings_of_either_store_dtype_travel_as_the_export_dtype(stored, dtype):
    """The store's float32 or float16 vectors become bytes of the export dtype before the joins."""
    from pipeline.stages.export import _as_bytes

    vectors = np.array([[0.1, -2.5, 3.0], [1e-3, 7.25, -0.5]], dtype=np.float32)
    values = pa.array(vectors.astype(stored.to_pandas_dtype()).ravel(), type=stored)
    batch = pa.table({"caption_id": ["a", "b"], "embedding": pa.FixedSizeListArray.from_arrays(values, 3)})
    out = _as_bytes(batch, dtype)
    assert out.column("caption_id").to_pylist() == ["a", "b"]
    got = np.stack([np.frombuffer(b, dtype=dtype) for b in out.column("vector").to_pylist()])
    np.testing.assert_array_equal(got, vectors.astype(stored.to_pandas_dtype()).astype(dtype))
    assert _as_bytes(batch.slice(0, 0), dtype).num_rows == 0


def test_shards_sizes_and_index_on_object_storage(s3, monkeypatch, tmp_path):
    """The same writers on the rig's S3 server: shards, sizes.json and _index.json; clearing
    removes only what an export writes."""
    from pipeline import uri
    from pipeline.webdataset_io import ExportIndex, clear_export, read_index, write_index, write_sizes

    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    bucket = s3.bucket(f"export-{hashlib.sha256(str(tmp_path).encode()).hexdigest()[:12]}")
    location = f"s3://{bucket}/export/embedded"
    assert write_tar(f"{location}/00000.tar", [Sample("k0", {"txt": b"a caption"})])[0] == 1
    write_sizes(location, {"00000.tar": 1})
    uri.write_text(f"{location}/notes.txt", "kept")
    assert read_index(location) is None
    write_index(location, ExportIndex(key="k", dataset="embedded", split=None, caption_versions=["original"], encoder_version=None,
                                      embedding_dtype=None, dim=None, samples_per_shard=1, shards=1, images=1, samples=1, captions=1,
                                      captions_without_embedding=0))
    assert read_index(location).samples == 1
    (tmp_path / "00000.tar").write_bytes(uri.read_bytes(f"{location}/00000.tar"))
    assert [s["txt"] for s in wds.WebDataset(str(tmp_path / "00000.tar"), shardshuffle=False).decode()] == ["a caption"]
    clear_export(location)
    objects = [k for k in s3.keys(bucket, "export/embedded/") if not k.endswith("/")]  # pyarrow's create_dir leaves a folder marker
    assert objects == ["export/embedded/notes.txt"] and read_index(location) is None
