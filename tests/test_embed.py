"""`jobs.embed` on the embedded default: one row per caption, incremental, rejects, CRA in MLflow."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from pipeline.config import load_config
from pipeline.faults import CRASH_AT, CRASH_ONCE_DIR
from pipeline.lineage import Lineage
from pipeline.stages.embed import embedding_matrix, plan_embed, store_vectors, write_files
from pipeline.store import Store, utc_now
from pipeline.text_encoder import TextEncoder
from tests.conftest import MODELS_DIR, REPO, job_env, load_result, run_job_here, run_stage_here, write_config
from tests.invariants import check_stores

EMBED = {"caption_versions": ["original", "provided"], "actors": 1, "cpus_per_actor": 1, "batch_size": 64, "bidirectional": False}


@pytest.fixture(scope="module")
def ingested(tmp_path_factory, cluster, models):
    root = tmp_path_factory.mktemp("embed")
    config = write_config(root / "c.yaml", root / "store", cluster, embed=EMBED)
    out = run_job_here("jobs.ingest", config, cluster)
    assert out.returncode == 0, out.stderr[-3000:]
    return root, config


@pytest.fixture(scope="module")
def first_embed(ingested, cluster):
    """A fault drill on the way: the encoder actor is SIGKILLed in its first batch (a crash point,
    once); Ray Data restarts it and retries the batch. The tests below check what was written."""
    root, config = ingested
    drill = {CRASH_AT: "embed.batch", CRASH_ONCE_DIR: str(root / "once")}  # its actors inherit them from the job's driver
    summary = root / "first-embed.json"
    out = subprocess.run([sys.executable, "-m", "jobs.embed", "--config", str(config), "--summary-json", str(summary)], cwd=REPO,
                         capture_output=True, text=True, env={**job_env(cluster), **drill}, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    assert (root / "once" / "embed.batch").is_file()  # the actor was killed mid-batch
    return load_result("jobs.embed", summary)


def _version(store) -> str:
    (version,) = Store(str(store), "embeddings").versions()
    return version


def test_one_row_per_caption(ingested, first_embed):
    root, _ = ingested
    captions = Store(str(root / "store"), "captions")
    n_captions = captions.num_rows("original") + captions.num_rows("provided")
    emb = Store(str(root / "store"), "embeddings").read(_version(root / "store"))
    assert emb.num_rows == n_captions
    assert len(set(emb.column("caption_id").to_pylist())) == n_captions
    matrix = np.stack(emb.column("embedding").to_numpy(zero_copy_only=False))
    assert matrix.shape == (n_captions, 576) and np.isfinite(matrix).all()
    assert first_embed.written == n_captions and first_embed.input_rows == n_captions
    check_stores(str(root / "store"))  # across the actor's kill: every version readable, no key twice


def test_embeddings_match_the_encoder_api(ingested, first_embed):
    """What the job wrote equals TextEncoder.encode on the same texts (bf16 tolerance)."""
    root, _ = ingested
    version = _version(root / "store")
    emb = Store(str(root / "store"), "embeddings").read(version).slice(0, 8)
    texts = {r["caption_id"]: r["text"] for r in Store(str(root / "store"), "captions").read("original").to_pylist()}
    texts |= {r["caption_id"]: r["text"] for r in Store(str(root / "store"), "captions").read("provided").to_pylist()}
    enc = TextEncoder.from_pretrained(MODELS_DIR / "smollm2-135m-instruct", bidirectional=False)
    assert enc.encoder_version == version
    expected = enc.encode([texts[c] for c in emb.column("caption_id").to_pylist()])
    got = np.stack(emb.column("embedding").to_numpy(zero_copy_only=False))
    cos = (expected * got).sum(1) / np.linalg.norm(expected, axis=1) / np.linalg.norm(got, axis=1)
    assert cos.min() > 0.99


def _encoder_actors() -> int:
    """Encoder actors the cluster has ever created (dead ones stay listed)."""
    from ray.util.state import list_actors

    return sum("EmbedCaptions" in a.class_name for a in list_actors(limit=10_000, detail=False))


def test_second_run_writes_nothing(ingested, first_embed, cluster, ray_session):
    """Not even with another embed.store_dtype: the store dtype is no part of what is embedded."""
    root, config = ingested
    version = _version(root / "store")
    before = len(Store(str(root / "store"), "embeddings").commits(version))
    actors = _encoder_actors()
    assert actors >= 1  # the first run's are listed: the count can see them
    assert plan_embed(load_config(config, ["embed.store_dtype=float32"])).exists
    out = run_stage_here("jobs.embed", config, cluster, "--set", "embed.store_dtype=float32")
    assert out.encoder_version == version and out.store_dtype == "float16"  # the version keeps its type
    assert out.written == 0 and out.skipped == out.input_rows == first_embed.written
    assert _encoder_actors() == actors  # nothing to do: no encoder actor was started
    assert len(Store(str(root / "store"), "embeddings").commits(version)) == before


def test_fp16_store_round_trip_and_equal_cra(ingested, first_embed, cluster, tmp_path):
    """The same captions, the same encoder, stored as float16 (the default: `first_embed`) and as
    float32 (a copy of the caption stores): about half the bytes, the same vectors to 1e-3 in
    cosine, the same held-out CRA."""
    root, config = ingested
    narrow, wide = root / "store", tmp_path / "store"
    for name in ("manifest", "captions"):
        shutil.copytree(narrow / name, wide / name)
    out = run_stage_here("jobs.embed", config, cluster, "--set", f"store.uri={wide}", "--set", "embed.store_dtype=float32")
    version = _version(narrow)
    assert out.encoder_version == version and (first_embed.store_dtype, out.store_dtype) == ("float16", "float32")
    stores = {dtype: Store(str(path), "embeddings") for dtype, path in (("float16", narrow), ("float32", wide))}
    tables = {dtype: store.read(version).sort_by("caption_id") for dtype, store in stores.items()}
    for dtype, table in tables.items():
        assert table.schema.field("embedding").type.value_type == pa.type_for_alias(dtype)
    assert tables["float16"].column("caption_id").equals(tables["float32"].column("caption_id"))
    a, b = (embedding_matrix(t.column("embedding")) for t in tables.values())
    assert a.dtype == b.dtype == np.float32
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    deviation = float(np.max(1 - cosine))
    size = {dtype: sum(s.fs.get_file_info(f).size for f in s.files(version)) for dtype, s in stores.items()}
    files = {dtype: len(s.files(version)) for dtype, s in stores.items()}
    cra = {dtype: {p: c.cra for p, c in r.cra.items()} for dtype, r in (("float16", first_embed), ("float32", out))}
    print(f"fp16 store: max cosine deviation {deviation:.2e}, bytes {size}, files {files}, CRA {cra}, rows {a.shape}")
    assert deviation < 1e-3
    assert size["float16"] < 0.6 * size["float32"]
    assert cra["float16"] == cra["float32"] and cra["float16"]  # every protocol, to the query


def test_an_embedding_beyond_float16_fails_naming_the_key():
    """What the encoder actors store: float16 lists, or an error naming embed.store_dtype, never inf."""
    emb = np.array([[0.5, -2.0], [1.0, 7.0e4]], dtype=np.float32)  # float16 ends at 65504
    assert store_vectors(emb[:1], "float16", ["c0"]).type.equals(pa.list_(pa.float16(), 2))
    with pytest.raises(ValueError, match="embed.store_dtype float16: the embedding of caption c1 has a value of 70000.*"
                                         "set embed.store_dtype: float32"):
        store_vectors(emb, "float16", ["c0", "c1"])
    assert store_vectors(emb, "float32", ["c0", "c1"]).to_pylist()[1] == [1.0, 7.0e4]


def test_a_commit_is_a_few_files_of_bounded_rows(tmp_path, ray_session):
    """Ray Data writes a commit as files of rows_per_file to twice as many rows: small blocks are
    gathered (not one file each), and no file holds everything."""
    import ray

    store = Store(str(tmp_path), "embeddings")
    rows = store.prepare(pa.Table.from_pylist(
        [{"caption_id": f"c{i:05d}", "image_id": "i", "text_sha256": "s", "encoder_version": "e", "dim": 4, "embedding": [i / 7.0] * 4}
         for i in range(2600)]))
    blocks = ray.data.from_arrow([rows.slice(i, 100) for i in range(0, rows.num_rows, 100)])  # 26 blocks, as the encoder's batches
    with store.begin("enc-x", Lineage(stage="test")) as txn:
        write_files(blocks, txn, rows_per_file=1000)
        txn.commit()
    sizes = sorted(pq.read_metadata(f).num_rows for f in store.files("enc-x"))
    assert sum(sizes) == 2600 and store.read("enc-x").num_rows == 2600
    assert 2 <= len(sizes) <= 3 and sizes[-1] <= 2000 and all(n >= 1000 for n in sizes[1:]), sizes


def test_cra_is_logged_to_mlflow(first_embed, cluster):
    client = MlflowClient(cluster["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("llm2clip-tests")
    runs = client.search_runs([exp.experiment_id], "tags.`llm2clip.stage` = 'embed'")
    run = next(r for r in runs if r.info.run_id == first_embed.mlflow_run_id)
    for key in ("cra.short-short", "cra.short-dense"):
        assert 0.0 <= run.data.metrics[key] <= 1.0
    assert run.data.metrics["written"] > 0


def test_bad_captions_are_rejected_and_counts_reconcile(tmp_path, cluster, models):
    store = tmp_path / "store"
    long_text = "a red circle next to a blue square " * 20
    rows = [("c-ok", "a small green star"), ("c-empty", "   "), ("c-long", long_text), ("c-ok2", "two circles")]
    Store(str(store), "captions").append(
        "user",
        pa.Table.from_pylist(
            [{"caption_id": c, "image_id": "img", "text": t, "source": "original", "caption_version": "user",
              "model": "", "prompt_id": "", "created_at": utc_now()} for c, t in rows]
        ),
    )
    embed = EMBED | {"caption_versions": ["user"], "overlong": "reject", "max_length": 16, "cra_split": None}
    config = write_config(tmp_path / "c.yaml", store, cluster, embed=embed, models={"dir": str(MODELS_DIR), "llm": str(models["tiny-llama"])})
    out = run_stage_here("jobs.embed", config, cluster)
    version = _version(store)
    assert sorted(Store(str(store), "embeddings").read(version).column("caption_id").to_pylist()) == ["c-ok", "c-ok2"]
    rejects = {r["record_id"]: r["reason"] for r in Store(str(store), "rejects").read(f"embed.{version}").to_pylist()}
    assert rejects == {"c-empty": "empty_caption", "c-long": "too_long"}
    assert (out.input_rows, out.written, out.rejected) == (4, 2, 2) and out.reject_reasons == {"empty_caption": 1, "too_long": 1}
    # the plan: the rejects stand under the same config (nothing to do); truncate would embed the long one
    assert plan_embed(load_config(config)).exists
    assert plan_embed(load_config(config, ["embed.overlong=truncate"])).reason == "1 of 4 captions to embed"
    # truncate instead: the long caption is embedded (cut to max_length), only the empty one is rejected
    out = run_stage_here("jobs.embed", config, cluster, "--set", "embed.overlong=truncate")
    assert (out.truncated, out.written, out.skipped) == (1, 1, 2)


def test_encoder_from_an_mlflow_uri(tmp_path, cluster, models):
    """embed.encoder accepts runs:/ URIs: the encoder is fetched from MLflow and the
    embedding version is that encoder's version."""
    client = MlflowClient(cluster["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("llm2clip-tests")
    run = client.create_run(exp.experiment_id, tags={"mlflow.runName": "encoder-artifact"})
    enc = TextEncoder.from_pretrained(models["tiny-qwen2"], pooling="last", bidirectional=True)
    enc.save_pretrained(tmp_path / "encoder")
    client.log_artifacts(run.info.run_id, str(tmp_path / "encoder"), "encoder")
    client.set_terminated(run.info.run_id)

    store = tmp_path / "store"
    Store(str(store), "captions").append(
        "user",
        pa.Table.from_pylist(
            [{"caption_id": f"c{i}", "image_id": "img", "text": t, "source": "original", "caption_version": "user",
              "model": "", "prompt_id": "", "created_at": utc_now()} for i, t in enumerate(["a red circle", "two blue squares"])]
        ),
    )
    embed = EMBED | {"caption_versions": ["user"], "cra_split": None, "encoder": f"runs:/{run.info.run_id}/encoder", "bidirectional": None}
    config = write_config(tmp_path / "c.yaml", store, cluster, embed=embed)
    out = run_job_here("jobs.embed", config, cluster)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    assert Store(str(store), "embeddings").versions() == [enc.encoder_version]
    got = Store(str(store), "embeddings").read(enc.encoder_version)
    expected = dict(zip(["c0", "c1"], enc.encode(["a red circle", "two blue squares"])))
    for cid, vec in zip(got.column("caption_id").to_pylist(), got.column("embedding").to_pylist()):
        cos = np.dot(expected[cid], vec) / np.linalg.norm(expected[cid]) / np.linalg.norm(vec)
        assert cos > 0.99
