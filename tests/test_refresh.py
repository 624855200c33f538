"""`jobs.refresh`: new images arrive in a listing; only they are ingested, captioned and
embedded; a refresh with nothing new does nothing; `--status` tells whether the last
refresh succeeded; each step is an MLflow run nested under the refresh's run."""

from __future__ import annotations

import json

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from pipeline.stages.refresh import refresh_records
from pipeline.config import load_config
from pipeline.store import Store
from tests.conftest import MODELS_DIR, TINY_VLM_RECAPTION, run_job, run_job_here, run_stage_here, write_config


def _add_images(folder, listing, start: int, count: int) -> None:
    rng = np.random.default_rng(start)
    folder.mkdir(parents=True, exist_ok=True)
    with open(listing, "a") as f:
        for i in range(start, start + count):
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / f"new{i}.png")
            f.write(json.dumps({"image": f"new{i}.png", "captions": [f"photo number {i} of a noisy pattern"]}) + "\n")


@pytest.fixture(scope="module")
def refreshes(tmp_path_factory, cluster, models):
    root = tmp_path_factory.mktemp("refresh")
    folder, listing = root / "incoming", root / "incoming" / "listing.jsonl"
    _add_images(folder, listing, 0, 5)
    config = write_config(
        root / "c.yaml", root / "store", cluster,
        ingest={"source": str(listing), "dataset": "incoming"},
        recaption=TINY_VLM_RECAPTION,
        embed={"encoder": str(MODELS_DIR / "tiny-llama"), "caption_versions": ["original"], "actors": 1, "batch_size": 32, "cra_split": None},
    )
    first = run_stage_here("jobs.refresh", config, cluster)
    _add_images(folder, listing, 100, 3)
    second = run_stage_here("jobs.refresh", config, cluster)
    third = run_stage_here("jobs.refresh", config, cluster)
    return root, config, [first, second, third]


def test_first_refresh_ingests_captions_and_embeds_everything(refreshes):
    root, _, (first, _, _) = refreshes
    assert first.status == "succeeded" and first.last_refresh is None
    assert first.ingest.added == 5
    assert first.recaption.captioned == 5
    assert first.embed.written == 10  # 5 originals + 5 dense captions
    version = first.recaption.caption_version
    emb = Store(str(root / "store"), "embeddings")
    (ev,) = emb.versions()
    dense_ids = set(Store(str(root / "store"), "captions").read(version).column("caption_id").to_pylist())
    assert dense_ids <= set(emb.read(ev).column("caption_id").to_pylist())


def test_second_refresh_handles_only_the_new_images(refreshes):
    root, _, (first, second, _) = refreshes
    assert second.last_refresh == first.started_at
    assert second.new_images_since_last_refresh == 3
    assert second.ingest.added == 3 and second.ingest.skipped == 5
    assert second.recaption.captioned == 3 and second.recaption.already_captioned == 5
    assert second.embed.written == 6 and second.embed.skipped == 10


def test_refresh_with_nothing_new_does_nothing(refreshes):
    _, _, (_, _, third) = refreshes
    assert third.new_images_since_last_refresh == 0
    assert third.ingest.added == 0
    assert third.recaption.captioned == 0 and third.recaption.generated_tokens == 0
    assert third.embed.written == 0


def test_the_refresh_record_is_the_result(refreshes):
    """What `--status` and the next refresh read back is each refresh's result as it ended."""
    _, config, results = refreshes
    records = refresh_records(load_config(config), "incoming")
    assert [r.started_at for r in records[:3]] == [r.started_at for r in results]
    for record, result in zip(records, results):
        assert record.finished_at and record.status == "succeeded"
        assert (record.ingest, record.recaption, record.embed) == (result.ingest, result.recaption, result.embed)
        assert record.mlflow_run_id == result.mlflow_run_id and record.manifest_commits


def test_steps_are_nested_mlflow_runs(refreshes, cluster):
    _, _, (first, _, _) = refreshes
    client = MlflowClient(cluster["MLFLOW_TRACKING_URI"])
    parent = client.get_run(first.mlflow_run_id)
    assert parent.data.tags["llm2clip.stage"] == "refresh" and parent.data.tags["llm2clip.refresh.status"] == "succeeded"
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.data.tags["llm2clip.stage"] for r in children) == ["embed", "ingest", "recaption"]
    assert all(r.info.status == "FINISHED" for r in children)


def test_status_reports_the_last_refresh(refreshes, cluster):
    root, config, _ = refreshes
    ok = run_job_here("jobs.refresh", config, cluster, "--status")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "last refresh: succeeded" in ok.stdout and "3 refreshes recorded" in ok.stdout
    # A refresh that fails (here: image mode with no VLM configured) is recorded as failed.
    failed = run_job("jobs.refresh", config, cluster, "--set", "recaption.model=null", "--set", "models.vlm=null")
    assert failed.returncode != 0 and "vision-language model" in failed.stderr
    status = run_job_here("jobs.refresh", config, cluster, "--status")
    assert status.returncode == 1 and "last refresh: failed" in status.stdout
