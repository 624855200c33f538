"""`jobs.train_clip` on the local cluster: Ray Data joins, Ray Train + DeepSpeed (ZeRO-1, 2 CPU
workers, gloo, bf16, gradient checkpointing), accumulation over micro-batches, MLflow tracking and registry, rejects,
a killed worker, a killed driver, and a store that gains an unrelated dataset."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.store import Store
from pipeline.training import SampleSet
from tests.conftest import MODELS_DIR, ingest_in_process, run_stage, start_job, wait_for_checkpoint, write_config

TINY = {
    "num_workers": 2,
    "cpus_per_worker": 0.5,
    "precision": "fp32",
    "embed_dim": 32,
    "global_batch_size": 8,
    "lr": 1.0e-3,
    "checkpoint_every": 3,
    "gradient_checkpointing": False,
    "register_alias": "candidate",
}
MODELS = {"dir": str(MODELS_DIR), "llm": str(MODELS_DIR / "tiny-llama"), "vision": str(MODELS_DIR / "tiny-clip-vision"),
          "clip_text": str(MODELS_DIR / "tiny-clip-text")}


def _config(root: Path, cluster, name: str, **train_clip) -> Path:
    return write_config(root / f"{name}.yaml", root / "store", cluster, models=MODELS, embedded={"num_scenes": 60, "image_size": 64},
                        embed={"actors": 1, "batch_size": 64, "cra_split": None}, train_clip={**TINY, **train_clip})


@pytest.fixture(scope="module")
def store(tmp_path_factory, cluster, models, ray_session):
    """The embedded default (60 scenes + 10 photos) ingested and embedded by the tiny Llama."""
    from pipeline.config import load_config
    from pipeline.stages.embed import run_embed
    from pipeline.stages.tracking import Tracker

    root = tmp_path_factory.mktemp("train-clip")
    config = _config(root, cluster, "prep")
    ingest_in_process(config)
    run_embed(load_config(config), Tracker(None, None))
    return root


@pytest.fixture(scope="module")
def trained(store, cluster):
    """The main run. Its input holds 8 more scenes whose captions have no embedding, and one
    training image whose file changed after ingest."""
    # accum_steps 2: the contrastive batch of 8 spans two micro-batches of 2 on each of 2 workers;
    # bf16 and gradient checkpointing as on GPUs (DeepSpeed's CPU accelerator here)
    config = _config(store, cluster, "main", epochs=2, accum_steps=2, precision="bf16", gradient_checkpointing=True, min_coverage=0.5)
    ingest_in_process(config, "embedded.num_scenes=68")  # 8 more scenes, not embedded
    stores = {n: Store(str(store / "store"), n) for n in ("manifest", "captions", "embeddings")}
    manifest = stores["manifest"].read("embedded").to_pylist()
    embedded = {k[0] for k in stores["embeddings"].keys(stores["embeddings"].versions()[0])}
    with_embedding = {c["image_id"] for c in stores["captions"].read("original").to_pylist() if c["caption_id"] in embedded}
    unembedded = {r["image_id"] for r in manifest if r["image_id"] not in with_embedding and r["split"] in ("train", "val")}
    victim = next(r for r in manifest if r["split"] == "train" and r["image_id"] in with_embedding)
    original = Path(victim["uri"]).read_bytes()  # the other tests share the image files: restored below
    Path(victim["uri"]).write_bytes(b"not the ingested bytes")
    try:
        summary = run_stage("jobs.train_clip", config, cluster)
    finally:
        Path(victim["uri"]).write_bytes(original)
    return config, summary, {"unembedded": unembedded, "victim": victim["image_id"]}


def test_trains_and_hands_over_a_registered_model(trained, cluster, monkeypatch):
    from pipeline.clip_model import LLM2CLIP

    monkeypatch.setenv("MLFLOW_TRACKING_URI", cluster["MLFLOW_TRACKING_URI"])  # where a models:/ URI is looked up
    _, summary, _ = trained
    assert summary["steps"] == 2 * (summary["training images"] // 8) and np.isfinite(summary["final loss"])
    val = summary["validation"]
    for name in ("short", "dense"):
        assert {f"{name}.{d}_R{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)} <= set(val)
        assert summary["chance R@1"][name] == pytest.approx(1 / val[f"{name}.images"], abs=1e-4)
    assert summary["MLflow model URI"].startswith("models:/llm2clip-model/")
    local = LLM2CLIP.from_pretrained(summary["model path"])
    registered = LLM2CLIP.from_pretrained(summary["MLflow model URI"])
    assert local.config.encoder_version == summary["encoder_version (embedding store version)"]
    pixels = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(local.encode_image(pixels), registered.encode_image(pixels), rtol=0, atol=0)
    emb = torch.randn(2, local.config.text_dim)
    torch.testing.assert_close(local.encode_text(emb), registered.encode_text(emb), rtol=0, atol=0)


def test_run_is_tracked_with_lineage_and_an_alias(trained, cluster):
    _, summary, _ = trained
    client = MlflowClient(cluster["MLFLOW_TRACKING_URI"])
    run_id = summary["mlflow run"].rsplit("/", 1)[1]
    steps = summary["steps"]
    assert sorted(m.step for m in client.get_metric_history(run_id, "train/loss")) == list(range(1, steps + 1))  # rank 0 only
    for metric in ("train/lr", "train/logit_scale", "train/samples_per_s", "train/data_wait_fraction"):
        assert len(client.get_metric_history(run_id, metric)) == steps, metric
    assert all(0 <= m.value <= 1 for m in client.get_metric_history(run_id, "train/data_wait_fraction"))
    assert len(client.get_metric_history(run_id, "val/dense.i2t_R1")) == 2  # after each epoch
    assert client.get_metric_history(run_id, "data/iterator_blocked_fraction")  # from Ray Data's iterator stats
    run = client.get_run(run_id)
    assert run.data.tags["llm2clip.inputs.embeddings"] == summary["encoder_version (embedding store version)"]
    mv = client.get_model_version_by_alias("llm2clip-model", "candidate")
    assert f"models:/llm2clip-model/{mv.version}" == summary["MLflow model URI"] and mv.run_id == run_id
    assert mv.tags["encoder_version"] == summary["encoder_version (embedding store version)"]
    assert json.loads(mv.tags["caption_versions"]) == {"provided": "provided", "original": "original"} and mv.tags["manifest"] == "embedded"


def test_an_unrelated_dataset_in_the_stores_keeps_the_run_name(trained, store, cluster, ray_session):
    """Another dataset (an evaluation set, say) ingested into the same stores changes neither the
    samples this run trains on nor its name, so the run resumes instead of starting over."""
    from pipeline.config import load_config
    from pipeline.stages.train_clip import CaptionPlan, load_samples, run_name_for, text_source
    from pipeline.stages.trainer import storage_path

    config, summary, _ = trained
    ingest_in_process(config, "ingest.dataset=unrelated", "embedded.num_scenes=12", "embedded.seed=1")
    cfg = load_config(config)
    assert "unrelated" in Store(cfg.store.uri, "manifest").versions()
    source, captions = text_source(cfg), CaptionPlan.of(cfg)
    data = load_samples(cfg, source, captions, storage_path(cfg.train_clip.settings(), cfg.run_dir))
    assert run_name_for(cfg, source, captions, data.digest) == summary["run name (resume key)"]
    assert data.num_train == summary["training images"]


def test_corrupt_and_unembedded_images_are_reported_and_skipped(trained, store):
    """The main run's changed image and its images without embeddings: counted, in the rejects
    store with their reasons, and the run completed."""
    _, summary, bad = trained
    assert bad["unembedded"] and sum(summary["skipped, no caption embedding"].values()) == len(bad["unembedded"])
    assert summary["rejected images"] == {"changed_since_ingest": 1}  # a whole epoch reads every training image
    rejects = Store(str(store / "store"), "rejects").read(f"train-clip.{summary['run name (resume key)']}").to_pylist()
    reasons = {r["record_id"]: r["reason"] for r in rejects}
    assert reasons[bad["victim"]] == "changed_since_ingest"
    assert {i for i, r in reasons.items() if r == "no_caption_embedding"} == bad["unembedded"]


def test_a_killed_worker_and_a_killed_driver_resume(tmp_path, store, cluster, ray_session):
    """With the baseline text tower (a CLIP text transformer reading caption text): the resume
    machinery is the shared trainer's, whichever tower trains."""
    from ray.util.state import list_actors

    root = tmp_path
    (root / "store").symlink_to(store / "store")
    config = _config(root, cluster, "kill", text_tower="clip", epochs=2, checkpoint_every=2, max_failures=2, register_as=None, seed=3)
    results = root / "run" / "ray_results"
    proc = start_job("jobs.train_clip", config, cluster)
    first = wait_for_checkpoint(results, "train-clip-", proc, 2)
    workers = [a for a in list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]) if a.pid]
    assert workers, "no train workers found"
    os.kill(workers[-1].pid, signal.SIGKILL)  # Ray Train replaces the group and resumes from the checkpoint
    # the replaced group goes on: a later checkpoint arrives while the driver lives (else this fails)
    reached = wait_for_checkpoint(results, "train-clip-", proc, first + 2, timeout=600)
    os.killpg(proc.pid, signal.SIGKILL)  # now the driver dies, and its workers with it
    proc.communicate(timeout=60)
    time.sleep(3)
    summary = run_stage("jobs.train_clip", config, cluster)
    assert summary["resumed from step"] is not None and summary["resumed from step"] >= reached
    assert summary["steps"] == 2 * (summary["training images"] // 8) and summary["text tower"] == "clip"
    # the data position: the last epoch trained each of its samples once, across the kills
    final = max((json.loads(p.read_text()) for p in results.glob("train-clip-*/checkpoint_*/train_state.json")), key=lambda s: s["step"])
    assert final["step"] == summary["steps"] and final["epoch"] == 1
    assert len(SampleSet.from_json(final["trained"])) == 8 * (final["step"] - final["epoch_start_step"])
