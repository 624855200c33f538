"""`jobs.ingest` on the embedded default and on user listings, against the real cluster and MLflow."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from mlflow.tracking import MlflowClient

from pipeline.store import Store
from tests.bad_images import EXPECTED, LIMITS, write_corpus
from tests.conftest import run_stage, write_config


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
