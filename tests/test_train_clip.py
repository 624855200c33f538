"""`jobs.train_clip` on the local cluster: Ray Data joins, Ray Train + DeepSpeed (ZeRO-1, 2 CPU
workers, gloo, bf16, gradient checkpointing), accumulation over micro-batches, MLflow tracking and registry, rejects,
a store that gains an unrelated dataset; and `jobs.sweep` on the samples the main run joined (a
cheap sweep whose driver is killed, then resumed). The shared trainer's kill points are drilled
in test_finetune_text, and train-clip's lost node in test_pipeline."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.config import load_config
from pipeline.stages.sweep import sweep_name
from pipeline.store import Store
from tests.conftest import (changed_since_ingest, CLIP_TINY, clip_config, ingest_in_process, run_stage_here, start_job, wait_for_free_cpus,
                            wait_until)

TINY = CLIP_TINY
_config = clip_config


@pytest.fixture(scope="module")
def store(clip_store):
    return clip_store


# the main run's recipe: accum_steps 2 (the contrastive batch of 8 spans two micro-batches of 2 on
# each of 2 workers); bf16 and gradient checkpointing as on GPUs (DeepSpeed's CPU accelerator here)
MAIN = dict(epochs=2, accum_steps=2, precision="bf16", gradient_checkpointing=True, min_coverage=0.5, standardise_text=True)


@pytest.fixture(scope="module")
def trained(store, cluster):
    """The main run. Its input holds 8 more scenes whose captions have no embedding, and one
    training image whose file changed after ingest."""
    from pipeline.stages.clip_samples import ClipInputs

    config = _config(store, cluster, "main", **MAIN)
    ingest_in_process(config, "embedded.num_scenes=68")  # 8 more scenes, not embedded
    stores = {n: Store(str(store / "store"), n) for n in ("manifest", "captions", "embeddings")}
    manifest = stores["manifest"].read("embedded").to_pylist()
    embedded = {k[0] for k in stores["embeddings"].keys(stores["embeddings"].versions()[0])}
    with_embedding = {c["image_id"] for c in stores["captions"].read("original").to_pylist() if c["caption_id"] in embedded}
    unembedded = {r["image_id"] for r in manifest if r["image_id"] not in with_embedding and r["split"] in ("train", "val")}
    # Ray Train deals every epoch to the workers in equal shards (streaming_split equal=True): the
    # rows it cannot deal evenly, the end of whichever block comes last, are read in no epoch. The
    # victim is a training sample inside its block (the samples are joined first: no image is
    # read), so every epoch reads it.
    cfg = load_config(config)
    samples = Path(ClipInputs.resolve(cfg).joined(cfg).samples.root) / "train"
    inside = {i for part in samples.glob("*.parquet") for i in pq.read_table(part, columns=["image_id"]).column("image_id").to_pylist()[:-1]}
    victim = next(r for r in manifest if r["split"] == "train" and r["image_id"] in with_embedding & inside)
    with changed_since_ingest(victim["uri"]):
        result = run_stage_here("jobs.train_clip", config, cluster)
    return config, result, {"unembedded": unembedded, "victim": victim["image_id"], "victim_uri": victim["uri"]}


def test_trains_and_hands_over_a_registered_model(trained, cluster, monkeypatch):
    from pipeline.clip_model import LLM2CLIP

    monkeypatch.setenv("MLFLOW_TRACKING_URI", cluster["MLFLOW_TRACKING_URI"])  # where a models:/ URI is looked up
    _, result, _ = trained
    assert result.steps == 2 * (result.train_images // 8) and np.isfinite(result.final_loss)
    val = result.validation
    for name in ("short", "dense"):
        assert {f"{name}.{d}_R{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)} <= set(val)
        assert result.chance[name] == pytest.approx(1 / val[f"{name}.images"], abs=1e-4)
    assert result.model_uri.startswith("models:/llm2clip-model/")
    local = LLM2CLIP.from_pretrained(result.model_path)
    registered = LLM2CLIP.from_pretrained(result.model_uri)
    assert local.config.encoder_version == result.encoder_version
    pixels = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(local.encode_image(pixels), registered.encode_image(pixels), rtol=0, atol=0)
    emb = torch.randn(2, local.config.text_dim)
    torch.testing.assert_close(local.encode_text(emb), registered.encode_text(emb), rtol=0, atol=0)
    # standardise_text: the training split's standardisation travelled to the workers and was saved
    assert local.text.input_shift.abs().sum() > 0 and not torch.allclose(local.text.input_scale, torch.ones(local.config.text_dim))


def test_run_is_tracked_with_lineage_and_an_alias(trained, cluster):
    _, result, _ = trained
    client = MlflowClient(cluster["MLFLOW_TRACKING_URI"])
    run_id = result.mlflow_run_id
    steps = result.steps
    assert sorted(m.step for m in client.get_metric_history(run_id, "train/loss")) == list(range(1, steps + 1))  # rank 0 only
    for metric in ("train/lr", "train/logit_scale", "train/samples_per_s", "train/data_wait_fraction"):
        assert len(client.get_metric_history(run_id, metric)) == steps, metric
    assert all(0 <= m.value <= 1 for m in client.get_metric_history(run_id, "train/data_wait_fraction"))
    assert len(client.get_metric_history(run_id, "val/dense.i2t_R1")) == 2  # after each epoch
    blocked = client.get_metric_history(run_id, "data/iterator_blocked_fraction")  # from Ray Data's iterator stats
    assert blocked and all(0 <= m.value <= 1.05 for m in blocked)  # per epoch, not summed over epochs
    run = client.get_run(run_id)
    assert run.data.tags["llm2clip.inputs.embeddings"] == result.encoder_version
    mv = client.get_model_version_by_alias("llm2clip-model", "candidate")
    assert f"models:/llm2clip-model/{mv.version}" == result.model_uri and mv.run_id == run_id
    assert mv.tags["encoder_version"] == result.encoder_version
    assert json.loads(mv.tags["caption_versions"]) == {"provided": "provided", "original": "original"} and mv.tags["manifest"] == "embedded"


SPACE = {
    "train_clip.text_lr": {"loguniform": [1.0e-3, 1.0e-2]},
    "train_clip.adapter_blocks": {"choice": [0, 1]},
    "train_clip.init_temperature": {"uniform": [0.05, 0.1]},
    "train_clip.caption_weights.provided": {"uniform": [0.2, 0.8]},
}
SWEEP = {"trials": 3, "max_epochs": 2, "grace_epochs": 1, "reduction_factor": 2, "concurrency": 2, "seed": 1, "space": SPACE}


def _trial_runs(client: MlflowClient, experiment_id: str, parent_id: str) -> list:
    return client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")


def _tune_ended(experiment: Path) -> set[str]:
    """The trials Tune's newest experiment state (what `Tuner.restore` reads) records as ended."""
    states = sorted(experiment.glob("experiment_state-*.json"), key=lambda p: p.stat().st_mtime)
    if not states:
        return set()
    try:
        trials = [json.loads(state) for state, _ in json.loads(states[-1].read_text())["trial_data"]]
    except (OSError, ValueError):  # being written
        return set()
    return {t["trial_id"] for t in trials if t["status"] == "TERMINATED"}


def test_a_killed_sweep_resumes_without_rerunning_finished_trials(trained, store, cluster, ray_session):
    """`jobs.sweep`, cheap mode, 3 trials on the tiny models (the frozen tiny CLIP tower's features
    cached in the feature store, Ray Tune + ASHA, every trial a Ray Train run of the shared
    trainer); its driver SIGKILLed once a trial has ended, then run again. Here, before the
    next test adds a dataset to the stores: it reads the samples the main run joined."""
    root = store
    config = _config(root, cluster, "sweep", sweep=SWEEP, min_coverage=0.5, standardise_text=True)
    client = MlflowClient(cluster["MLFLOW_TRACKING_URI"])
    experiment_id = client.get_experiment_by_name("llm2clip-tests").experiment_id
    name = sweep_name(load_config(config))

    def finished_trials() -> set[str]:
        parents = client.search_runs([experiment_id], filter_string=f"tags.`llm2clip.stage` = 'sweep' and tags.`llm2clip.sweep` = '{name}'")
        runs = _trial_runs(client, experiment_id, parents[0].info.run_id) if parents else []
        return {r.data.tags["llm2clip.trial_id"] for r in runs if r.info.status == "FINISHED"}

    proc = start_job("jobs.sweep", config, cluster)
    first = wait_until(finished_trials, 600, "no trial finished", proc, every=1.0)
    experiment = root / "run" / "ray_results" / "sweeps" / name
    wait_until(lambda: first <= _tune_ended(experiment), 60, "Tune's experiment state did not record the finished trial", proc)
    killed_at = time.time() * 1000
    os.killpg(proc.pid, signal.SIGKILL)  # the driver dies with the trials it runs
    proc.wait(timeout=60)
    # finished before the kill: in MLflow and in the state Tune resumes from (a trial may finish in
    # MLflow a moment before Tune records it; the resumed sweep then runs it again, rightly)
    finished_before = finished_trials() & _tune_ended(experiment)
    assert len(finished_before) < SWEEP["trials"], "every trial finished before the kill: nothing was left to resume"
    wait_for_free_cpus()

    result = run_stage_here("jobs.sweep", config, cluster)  # in this process: the driver's imports cost more than its work
    assert result.name == name and result.resumed is True and result.trials == SWEEP["trials"] and result.errored == 0
    assert result.finished + result.stopped_early == SWEEP["trials"] and result.scheduler == "asha" and result.search == "random"
    # the same parent run, reopened (not a second one)
    parent_id = result.mlflow_run_id
    assert parent_id == client.search_runs([experiment_id], filter_string=f"tags.`llm2clip.sweep` = '{name}' and "
                                           "tags.`llm2clip.stage` = 'sweep'")[0].info.run_id
    assert client.get_run(parent_id).info.status == "FINISHED"
    # one nested run per trial, with its drawn values as params and its validation curve
    table = json.loads(Path(client.download_artifacts(parent_id, "sweep/trials.json", str(root))).read_text())
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    trials = {r.data.tags["llm2clip.trial_id"]: r for r in _trial_runs(client, experiment_id, parent_id)}
    assert sorted(trials) == sorted(r["trial"] for r in rows) and len(trials) == SWEEP["trials"]
    for row in rows:
        run = trials[row["trial"]]
        assert run.data.tags["mlflow.parentRunId"] == parent_id and run.info.status == "FINISHED"
        for key in SPACE:
            assert float(run.data.params[key]) == pytest.approx(row[key], abs=1e-9)  # MLflow tables keep 9 decimals
        curve = client.get_metric_history(run.info.run_id, "val/mean_R1")
        assert 1 <= len({m.step for m in curve}) <= 2 and 1 <= row["epochs"] <= 2
        assert run.data.metrics["final/mean_R1"] == pytest.approx(row["mean_R1"], abs=1e-9)
    # finished trials were not run again; every other trial was (re)started by the resumed sweep
    for trial_id, run in trials.items():
        if trial_id in finished_before:
            assert run.data.tags["llm2clip.trial_attempts"] == "1", trial_id
        else:
            assert run.data.tags["llm2clip.trial_attempts"] == "2" or run.info.start_time > killed_at, trial_id

    # the best config: a valid config with the best trial's values, on disk and in MLflow
    best = load_config(result.best_config_path)
    for key, value in result.best_params.items():
        field = key.split(".", 1)[1]
        got = best.train_clip.caption_weights["provided"] if field == "caption_weights.provided" else getattr(best.train_clip, field)
        assert got == value
    assert best.train_clip.epochs == load_config(config).train_clip.epochs  # the retrain's budget is the base config's
    # among the trials ASHA let finish; when it stopped every one early (timing decides), among all
    pool = [r["mean_R1"] for r in rows if r["status"] == "finished"] or [r["mean_R1"] for r in rows if r["mean_R1"] is not None]
    assert result.best_metric == round(max(pool), 4)
    artifacts = {a.path for a in client.list_artifacts(parent_id, "sweep")}
    assert {"sweep/parallel_coordinates.png", "sweep/trials.json", "sweep/best_train_clip.yaml"} <= artifacts
    # the frozen tower's features, once per sample image, in a version of the feature store
    features = Store(str(store / "store"), "features")
    assert features.num_rows(result.features.version) == result.features.images and not result.features.rejected


def test_an_unrelated_dataset_in_the_stores_keeps_the_run_name(trained, store, cluster, ray_session):
    """Another dataset (an evaluation set, say) ingested into the same stores changes neither the
    samples this run trains on nor its name, so the run resumes instead of starting over."""
    from pipeline.stages.clip_samples import ClipInputs, load_samples
    from pipeline.stages.train_clip import run_name_for

    config, result, _ = trained
    ingest_in_process(config, "ingest.dataset=unrelated", "embedded.num_scenes=12", "embedded.seed=1")
    cfg = load_config(config)
    assert "unrelated" in Store(cfg.store.uri, "manifest").versions()
    inputs = ClipInputs.resolve(cfg)
    data = load_samples(cfg, inputs)
    assert run_name_for(cfg, inputs, data.meta) == result.run_name
    assert data.meta.num_train == result.train_images


def test_corrupt_and_unembedded_images_are_reported_and_skipped(trained, store):
    """The main run's changed image and its images without embeddings: counted, in the rejects
    store with their reasons, and the run completed."""
    _, result, bad = trained
    assert bad["unembedded"] and sum(result.skipped_no_embedding.values()) == len(bad["unembedded"])
    assert result.rejected == {"changed_since_ingest": 1}  # a whole epoch reads every training image
    rejects = Store(str(store / "store"), "rejects").read(f"train-clip.{result.run_name}").to_pylist()
    reasons = {r["record_id"]: r["reason"] for r in rejects}
    assert reasons[bad["victim"]] == "changed_since_ingest"
    assert {i for i, r in reasons.items() if r == "no_caption_embedding"} == bad["unembedded"]


def test_the_one_task_join_equals_ray_datas(trained, tmp_path, ray_session):
    """Small inputs are joined in one Arrow task, big ones in Ray Data's hash joins: the same
    samples, ids, captions, vectors, digest and counts either way."""
    import pyarrow.fs as pafs

    from pipeline.stages.clip_samples import ClipInputs, join_samples

    config, _, _ = trained
    cfg = load_config(config)
    inputs = ClipInputs.resolve(cfg)
    metas, tables = {}, {}
    for one_task in (True, False):
        root = str(tmp_path / f"one-task-{one_task}")
        metas[one_task] = join_samples(cfg, inputs.source, inputs.captions, pafs.LocalFileSystem(), root, one_task=one_task)
        tables[one_task] = {s: pq.read_table(f"{root}/{s}") for s in ("train", "val")}
    a, b = metas[True], metas[False]
    assert (a.num_train, a.num_val, a.digest, a.images) == (b.num_train, b.num_val, b.digest, b.images)
    assert {k: sorted(v) for k, v in a.missing.items()} == {k: sorted(v) for k, v in b.missing.items()} and any(a.missing.values())
    assert a.num_train == tables[True]["train"].num_rows > 0
    for split, key in (("train", "sample_id"), ("val", "image_id")):  # validation ids are any ids
        one, ray_data = (tables[o][split].sort_by(key) for o in (True, False))
        assert set(one.column_names) == set(ray_data.column_names)
        drop = ["sample_id"] if split == "val" else []
        assert one.drop_columns(drop).to_pylist() == ray_data.select(one.column_names).drop_columns(drop).to_pylist()
