"""`jobs.finetune_text` on the local cluster: Ray Train + DeepSpeed (ZeRO-2 and ZeRO-3, 2 CPU
workers, gloo) on a tiny Llama; checkpoints, a killed worker, a stopped job, MLflow and the
hand-over to `jobs.embed`."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from pipeline.store import Store
from pipeline.text_encoder import TextEncoder
from pipeline.training import TrainState
from tests.conftest import MODELS_DIR, crash_job, ingest_in_process, registered_step, run_stage_here, wait_for_free_cpus, write_config

TINY = {
    "base_model": str(MODELS_DIR / "tiny-llama"),
    "num_workers": 2,
    "batch_size_per_worker": 4,
    "max_length": 64,
    "lr": 1.0e-3,
    "warmup_steps": 2,
    "precision": "fp32",
    "builtin_eval": [],
    "baseline": False,
    "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
}


@pytest.fixture(scope="module")
def store(tmp_path_factory, cluster, models):
    root = tmp_path_factory.mktemp("finetune")
    config = write_config(root / "c.yaml", root / "store", cluster, finetune_text=TINY)
    ingest_in_process(config)
    return root


def _config(root: Path, cluster, name: str, **finetune) -> Path:
    return write_config(root / f"{name}.yaml", root / "store", cluster, finetune_text={**TINY, **finetune},
                        embed={"actors": 1, "batch_size": 64, "cra_split": None})


@pytest.fixture(scope="module")
def zero2(store, cluster):
    config = _config(store, cluster, "zero2", zero_stage=2, max_steps=6, checkpoint_every=3, mntp_steps=2)
    return config, run_stage_here("jobs.finetune_text", config, cluster)


def test_zero2_trains_and_hands_over_a_merged_encoder(zero2):
    _, result = zero2
    assert result.steps == 6 and np.isfinite(result.final_loss)
    encoder = TextEncoder.from_pretrained(result.encoder_path)
    assert encoder.encoder_version == result.encoder_version
    assert encoder.options.bidirectional and encoder.options.pooling == "mean"
    assert result.model_uri.startswith("models:/llm2clip-text-encoder/")
    assert set(result.cra_before) == set(result.cra_after) >= {"scenes.short-dense"}


def test_run_is_tracked_with_per_step_loss_and_a_registered_model(zero2, cluster):
    _, result = zero2
    client = MlflowClient(cluster["MLFLOW_TRACKING_URI"])
    run_id = result.mlflow_run_id
    history = client.get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5, 6]  # rank 0 only: one value per step
    assert len(client.get_metric_history(run_id, "train/lr")) == 6
    run = client.get_run(run_id)
    assert "cra_after.scenes.short-dense" in run.data.metrics and "cra_before.scenes.short-dense" in run.data.metrics
    assert run.data.tags["llm2clip.output.encoder_version"] == result.encoder_version
    name, version = result.model_uri.removeprefix("models:/").split("/")
    mv = client.get_model_version(name, version)
    assert mv.tags["encoder_version"] == result.encoder_version
    # this run's version, or that of an earlier run that saved the identical weights (a persistent
    # MLflow, e.g. a second local session): never a second version of the same encoder
    assert mv.run_id == run_id or client.get_run(mv.run_id).data.tags["llm2clip.output.encoder_version"] == result.encoder_version
    same = [v for v in client.search_model_versions(f"name='{name}'") if v.tags.get("encoder_version") == result.encoder_version]
    assert len(same) == 1


def test_embed_takes_the_registered_encoder(zero2, store, cluster):
    config, result = zero2
    out = run_stage_here("jobs.embed", config, cluster, "--set", f"embed.encoder={result.model_uri}")
    assert out.encoder_version == result.encoder_version
    assert result.encoder_version in Store(str(store / "store"), "embeddings").versions()
    # the other hand-over forms name the same encoder: its path and its encoder_version
    from pipeline.config import load_config
    from pipeline.stages.embed import resolve_encoder

    for ref in (result.encoder_path, result.encoder_version):
        path = resolve_encoder(load_config(config, [f"embed.encoder={ref}"]))
        assert TextEncoder.from_pretrained(path).encoder_version == result.encoder_version, ref
    with pytest.raises(ValueError, match="embed.encoder: no encoder with encoder_version enc-0000000000000000"):
        resolve_encoder(load_config(config, ["embed.encoder=enc-0000000000000000"]))


def test_zero3_trains_with_two_workers(store, cluster):
    pairs = [{"first": "original", "second": "provided"}, {"first": "provided", "reorder_sentences": True}]
    result = run_stage_here("jobs.finetune_text", _config(store, cluster, "zero3", zero_stage=3, max_steps=4, checkpoint_every=2,
                                                     register_as=None, pairs=pairs), cluster)
    assert result.steps == 4 and np.isfinite(result.final_loss) and result.registered is None
    assert set(result.cra_after) >= {"heldout.original-vs-provided", "heldout.provided-vs-reordered"}
    assert TextEncoder.from_pretrained(result.encoder_path).encoder_version == result.encoder_version


def test_a_killed_worker_then_a_driver_killed_mid_save_resume_from_the_last_registered(tmp_path, store, cluster, ray_session):
    """The shared trainer's two kill points (train-clip runs the same loop; its lost node is
    drilled in test_pipeline). A worker dies mid-step: Ray Train replaces the group, which resumes
    from the last checkpoint. Then the driver dies while the new group saves a ZeRO-2 checkpoint
    (a crash point in a worker kills it): the re-run resumes from the last checkpoint Ray Train
    registered, never from the half-saved one, with its tensors, lr and position in the epoch."""
    root = tmp_path
    (root / "store").symlink_to(store / "store")
    # repeats make one epoch longer than the run, so the stops fall inside it
    pairs = [{"first": "original", "second": "provided", "repeat": 10}, {"first": "original", "second": "original", "repeat": 10}]
    config = _config(root, cluster, "faults", max_steps=16, epochs=10, checkpoint_every=4, register_as=None, seed=12, pairs=pairs,
                     max_failures=1)
    # saves at steps 4 and 8; a worker process dies in step 11 (one rank's SIGKILL), the replaced
    # group resumes from 8 (or 4: a save counts once the controller has polled every rank's report);
    # the driver dies while the new group saves 12
    output = crash_job("jobs.finetune_text", config, cluster, ["train.step@step11:self", "train.checkpoint_saving@step12:driver"],
                       root / "fired")
    resumes = re.findall(r"resumed finetune-text-\w+ from step (\d+)", output)
    assert len(set(resumes)) == 1 and resumes[0] in ("4", "8"), (resumes, output[-3000:])  # the replaced group, once
    registered = registered_step(root / "run" / "ray_results", "finetune-text-")
    # a save counts once Ray Train's controller has collected every rank's report: 8, or 4 if the
    # driver died before it polled the workers again; never 12
    assert registered in (4, 8), registered
    wait_for_free_cpus()
    result = run_stage_here("jobs.finetune_text", config, cluster)
    assert result.steps == 16 and result.resumed_from_step == registered
    assert result.resume_verified is True  # every tensor as saved, not only the step
    # the data position: the epoch that spans the kill trained each of its pairs once
    state = max((TrainState.from_json(p.read_text()) for p in (root / "run" / "ray_results").glob("finetune-text-*/checkpoint_*/train_state.json")),
                key=lambda s: s.step)
    assert state.step == 16 and state.epoch == 0 and result.train_pairs > 8 * 16
    assert len(state.trained) == 8 * (state.step - state.epoch_start_step)


def test_a_resumed_epoch_trains_exactly_the_pairs_it_had_not():
    import pandas as pd

    from pipeline.training import unseen_batches

    frames = [pd.DataFrame({"pair_id": range(i, i + 5), "first": [f"t{j}" for j in range(i, i + 5)]}) for i in range(0, 20, 5)]
    seen = {0, 3, 4, 11, 19}
    batches = list(unseen_batches(iter(frames), 4, seen))
    ids = [i for b in batches for i in b["pair_id"]]
    assert all(len(b["pair_id"]) == 4 for b in batches) and len(batches) == 3  # 15 unseen: 3 full batches, 3 left over
    assert len(set(ids)) == len(ids) and not set(ids) & seen and ids == sorted(ids)
    assert batches[0]["first"] == ["t1", "t2", "t5", "t6"]


def test_reordered_pairs_keep_every_sentence_in_another_order():
    import pyarrow as pa

    from pipeline.config import PairSource
    from pipeline.finetune_pairs import reordered_pairs

    texts = ["A red cube sits left. A blue ball is on top! Is it big? Yes.", "One sentence only.", "Another caption. Of img0."]
    table = pa.table({"image_id": ["img0", "img1", "img0"], "text": texts})
    pairs = reordered_pairs(table, seed=0)
    assert [(item, a) for item, a, _ in pairs] == [("img0", texts[0])]  # first caption per item, 2+ sentences
    _, a, b = pairs[0]
    assert b != a and sorted(b.split()) == sorted(a.split())
    assert reordered_pairs(table, seed=0) == pairs
    with pytest.raises(ValueError, match="give only first"):
        PairSource(first="provided", second="original", reorder_sentences=True)


def test_no_held_out_item_reaches_a_training_pair(store, cluster):
    """Items of `eval_split` are held out: none of them is in a training pair (a leak would
    inflate every CRA-after figure), and they are the held-out CRA sets."""
    from pipeline.config import load_config
    from pipeline.finetune_pairs import training_pairs

    cfg = load_config(_config(store, cluster, "held-out"))
    pairs, held_out = training_pairs(cfg)
    manifest = Store(cfg.store.uri, "manifest").read(cfg.ingest.dataset, columns=["image_id", "split"]).to_pylist()
    held = {r["image_id"] for r in manifest if r["split"] == cfg.finetune_text.eval_split}
    assert held and all(held_out.values())
    trained = set(pairs.column("item").to_pylist())
    assert trained and not trained & held
    assert trained <= {r["image_id"] for r in manifest}  # every pair is of this dataset's images


def test_an_unrelated_dataset_in_the_stores_keeps_the_run_name(store, cluster):
    """The resume key hashes the pairs trained on: captions that other datasets add to the same
    caption versions (an evaluation set, say) leave it alone, so a rerun resumes."""
    from pipeline.config import load_config
    from pipeline.finetune_pairs import training_pairs
    from pipeline.stages.finetune_text import run_name_for

    config = _config(store, cluster, "unrelated")
    cfg = load_config(config)
    before, _ = training_pairs(cfg)
    name = run_name_for(cfg, cfg.models.llm, before)
    commits = len(Store(cfg.store.uri, "captions").commits("original"))
    ingest_in_process(config, "ingest.dataset=unrelated", "embedded.seed=1")
    assert len(Store(cfg.store.uri, "captions").commits("original")) > commits  # the store did change
    after, _ = training_pairs(cfg)
    assert after.equals(before) and run_name_for(cfg, cfg.models.llm, after) == name
    assert run_name_for(load_config(config, ["finetune_text.num_workers=4", "finetune_text.checkpoint_every=7"]), cfg.models.llm, after) == name
