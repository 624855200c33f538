"""`jobs.pipeline` end to end on a tiny config, where users run it: on object storage, across
two Ray nodes that share no disk.

The rig (tests/conftest.py): an S3-protocol server on loopback holds the listing, the stores,
the training storage, the models and MLflow's artifacts; a second Ray node runs in a private
mount namespace where the head's scratch and the repository's `.run/` are hidden, so a path
handed across nodes that is not on storage fails. The embed actors, the train-clip workers and
the evaluate actors need the second node's custom resource: they run there.

One module fixture runs the pipeline as a user's cluster would see it go wrong: the driver is
killed by a crash point between two stages (after embed); the second run loses the second
node (its raylet SIGKILLed) while train-clip trains, once a checkpoint is registered, and
finishes when the node is back, train-clip resumed from its checkpoint. The stores are checked
after every kill (every version readable, no key twice, nothing committed lost). A third run
does nothing. The parent MLflow run is then reviewed in a real browser.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import ray
from mlflow.tracking import MlflowClient

from pipeline import uri
from pipeline.config import load_config
from pipeline.plans import read_result
from pipeline.stages.pipeline import plan_pipeline
from pipeline.stages.train_clip import TrainClipResult
from pipeline.stages.runtime import worker_runtime_env
from pipeline.training import TrainState
from tests.conftest import (MODELS_DIR, REPO, TEST_RUN_DIR, connect_here, job_env, job_output, load_result, run_job_here, wait_for_checkpoint, wait_until,
                            write_config)
from tests.invariants import assert_kept, check_stores

EXPERIMENT = "llm2clip-tests-pipeline"
STAGES = ["ingest", "recaption", "embed", "corpus", "finetune-text", "embed-finetuned", "train-clip", "evaluate"]
MODELS = ("tiny-llama", "tiny-clip-vision", "tiny-clip-text", "smollm2-135m-instruct")


def _config(root: Path, cluster, bucket: str, node: str) -> Path:
    models = f"s3://{bucket}/models"
    on_node = {node: 1}
    return write_config(
        root / "p.yaml", f"s3://{bucket}/store", cluster,
        storage_uri=f"s3://{bucket}/run",
        mlflow={"experiment": EXPERIMENT},
        models={"dir": str(MODELS_DIR), "llm": f"{models}/tiny-llama", "vision": f"{models}/tiny-clip-vision",
                "clip_text": f"{models}/tiny-clip-text"},
        embedded={"num_scenes": 24, "image_size": 64, "paraphrases": 1},
        recaption={"mode": "text", "prompt": "Rewrite this short photo caption as a detailed description of the scene: {caption}",
                   "model": f"{models}/smollm2-135m-instruct", "actors": 1, "batch_size": 32, "sampling": {"max_tokens": 16},
                   "engine_env": {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}},
        embed={"actors": [1, 2], "batch_size": 64, "cra_split": None, "resources_per_actor": on_node},
        finetune_text={"pairs": [{"first": "original", "second": "provided"}], "num_workers": 2,
                       "batch_size_per_worker": 2, "max_steps": 3, "checkpoint_every": 3, "precision": "fp32", "max_length": 48,
                       "builtin_eval": [], "baseline": False, "register_as": "llm2clip-tests-pipeline-encoder", "eval_split": "test",
                       "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
        train_clip={"num_workers": 2, "cpus_per_worker": 0.5, "precision": "fp32", "embed_dim": 32, "global_batch_size": 8,
                    "lr": 1.0e-3, "epochs": 3, "checkpoint_every": 2, "max_failures": 3, "register_as": "llm2clip-tests-pipeline-model",
                    "register_alias": "candidate", "caption_weights": {"provided": 0.5, "original": 0.5},
                    "resources_per_worker": on_node},
        evaluate={"sets": [{"name": "heldout", "kind": "dataset", "split": "test"}], "cra_sets": ["everyday-pairs"],
                  "minilm_baseline": False, "actors": 1, "resources_per_actor": on_node},
    )


def _start(config: Path, cluster, env: dict[str, str], log: str, **extra) -> subprocess.Popen:
    out = open(config.parent / log, "w")  # noqa: SIM115 - held by the child
    proc = subprocess.Popen([sys.executable, "-m", "jobs.pipeline", "--config", str(config), "--summary-json",
                             str(config.parent / f"{log}.json")], cwd=REPO, env={**job_env(cluster), **env, **extra}, stdout=out,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    proc.log_path = Path(out.name)
    return proc


def test_the_second_nodes_workers_see_none_of_the_heads_disk(second_node, tmp_path):
    head_file = TEST_RUN_DIR / "rig-probe.txt"
    head_file.write_text("only on the head")
    models = REPO / ".run" / "models"
    paths = [head_file, TEST_RUN_DIR / "ray", models, *second_node.hidden]

    @ray.remote(num_cpus=0.1, resources={second_node.resource: 1})
    def probe(paths: list[str]) -> dict:
        import pipeline

        scratch = os.environ["LLM2CLIP_RUN_DIR"]
        with open(os.path.join(scratch, "written-on-node2.txt"), "w") as f:
            f.write("only on node 2")
        return {"node": ray.get_runtime_context().get_node_id(), "mnt": os.readlink("/proc/self/ns/mnt"), "parent": os.getppid(),
                "exists": {p: os.path.exists(p) for p in paths}, "listed": {p: os.listdir(p) for p in paths if os.path.isdir(p)},
                "scratch": scratch, "aws": sorted(k for k in os.environ if k.startswith("AWS_")), "code": pipeline.__file__}

    seen = ray.get(probe.remote([str(p) for p in paths]))
    assert seen["node"] == second_node.node_id() and seen["node"] != ray.get_runtime_context().get_node_id()
    # A worker the raylet started, in the raylet's mount namespace, not the head's.
    raylet = second_node.raylet_pid()
    assert seen["parent"] == raylet
    assert seen["mnt"] == os.readlink(f"/proc/{raylet}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
    assert head_file.exists() and not seen["exists"][str(head_file)]
    assert not seen["exists"][str(TEST_RUN_DIR / "ray")] and not seen["exists"][str(models)]
    assert all(listing == [] for listing in seen["listed"].values()), seen["listed"]  # hidden folders: empty
    # Its own scratch, which the head does not see; the repository's code it runs.
    assert seen["scratch"] == str(second_node.scratch) and not (second_node.scratch / "written-on-node2.txt").exists()
    assert seen["code"] == str(REPO / "pipeline" / "__init__.py")
    # No storage settings of its own (the raylet has no AWS_*): exactly what this driver hands on
    # to its job's workers (runtime_env), which the pipeline's jobs do as well.
    raylet_env = open(f"/proc/{raylet}/environ", "rb").read().split(b"\0")
    assert not [v for v in raylet_env if v.startswith(b"AWS_")], raylet_env
    handed = sorted(k for k in worker_runtime_env()["env_vars"] if k.startswith("AWS_"))
    assert seen["aws"] == handed and "AWS_ENDPOINT_URL" in handed, (seen["aws"], handed)


@pytest.fixture(scope="module")
def killed(tmp_path_factory, cluster, models, s3, second_node):
    """The pipeline killed, then its second node lost, then finished: (config, result, the store keys after each kill, logs)."""
    root = tmp_path_factory.mktemp("pipeline")
    bucket = s3.bucket("rig-pipeline")
    for name in MODELS:
        uri.upload_dir(MODELS_DIR / name, f"s3://{bucket}/models/{name}")
    config = _config(root, cluster, bucket, second_node.resource)
    store, storage = f"s3://{bucket}/store", f"s3://{bucket}/run"
    dry = run_job_here("jobs.pipeline", config, cluster, "--dry-run")
    assert dry.returncode == 0, dry.stdout + dry.stderr[-3000:]

    # 1. a crash point kills the driver right after embed has finished
    first = _start(config, cluster, s3.env, "run1.log", LLM2CLIP_CRASH_AT="pipeline.after.embed")
    assert first.wait(timeout=900) == -signal.SIGKILL, job_output(first, 10**8)
    after_first = check_stores(store)

    # 2. the second node's raylet SIGKILLed while train-clip trains there; the node comes back
    #    and the run goes on, train-clip restarted from its last checkpoint
    second = _start(config, cluster, s3.env, "run2.log")
    step = wait_for_checkpoint(f"{storage}/ray_results", "train-clip-", second, at_least=2, timeout=900)
    second_node.kill_raylet()
    wait_until(lambda: not second_node.alive(), 120, "the killed node is still alive", second)
    after_kill = check_stores(store)
    second_node.start()
    assert second.wait(timeout=900) == 0, job_output(second, 10**8)
    result = load_result("jobs.pipeline", root / "run2.log.json")
    return {"config": config, "root": root, "store": store, "storage": storage, "bucket": bucket, "dry": dry.stdout,
            "result": result, "checkpoint_step": step, "keys": [after_first, after_kill],
            "logs": [job_output(p, 10**8) for p in (first, second)]}


def test_dry_run_says_what_would_run(killed):
    lines = [line.split() for line in killed["dry"].splitlines() if line.split() and line.split()[0] in STAGES]
    assert [(parts[0], parts[1]) for parts in lines] == [(s, "run") for s in STAGES]


def test_a_crash_between_stages_and_a_lost_node_in_train_clip_resume(killed):
    result, logs = killed["result"], killed["logs"]
    assert "crash point pipeline.after.embed" in logs[0]
    assert "pipeline: corpus runs" not in logs[0]
    # run 2 skipped what run 1 finished and ran the rest, through the loss of a node
    actions = {r.stage: r.action for r in result.stages}
    for stage in ("ingest", "recaption", "embed", "corpus"):
        assert f"pipeline: {stage} skipped" in logs[1] and actions[stage] == "skipped", (stage, actions[stage])
    assert "pipeline: corpus skipped: not used" in logs[1]  # these pairs read no corpus (test_corpus builds one)
    assert all(actions[s] == "ran" for s in ("finetune-text", "embed-finetuned", "train-clip", "evaluate")), actions
    # train-clip's own result: its workers restarted on the returned node, from the checkpoint registered before the kill
    storage = f"{killed['storage']}/ray_results"
    run_name = uri.name(uri.parent(uri.parent(result.handover.model_path)))
    trained = read_result(storage, run_name, TrainClipResult)
    assert trained.model_path == result.handover.model_path
    assert trained.resumed_from_step is not None and trained.resumed_from_step >= killed["checkpoint_step"]
    assert trained.steps >= trained.resumed_from_step and not trained.reused
    assert trained.resume_verified is True  # parameters, optimizer state and lr hashed as at the checkpoint
    # the data position, on storage: the last epoch trained each of its samples once (global batch 8)
    states = [TrainState.from_json(uri.read_text(uri.uri_of(storage, f.path))) for f in uri.list_files(storage)
              if f.path.endswith("/train_state.json") and f"/{run_name}/checkpoint_" in f.path]
    final = max(states, key=lambda s: s.step)
    assert final.step == trained.steps and final.epoch == 2  # epochs: 3
    assert len(final.trained) == 8 * (final.step - final.epoch_start_step)


def test_no_store_gains_a_duplicate_and_nothing_committed_is_lost(killed):
    final = check_stores(killed["store"])
    for before in killed["keys"]:
        assert_kept(before, final)
    # the handed-over versions are the ones in the stores
    out = killed["result"].handover
    assert ("embeddings", out.embeddings) in final and ("embeddings", out.finetuned_embeddings) in final
    assert ("captions", out.captions) in final and ("manifest", out.manifest) in final


def test_outputs_are_handed_over_as_versions_paths_and_uris(killed):
    out = killed["result"].handover
    assert out.encoder_version.startswith("enc-") and out.finetuned_embeddings == out.encoder_version
    assert out.embeddings.startswith("enc-") and out.embeddings != out.encoder_version
    storage = f"s3://{killed['bucket']}/"
    assert out.encoder_path.startswith(storage) and out.model_path.startswith(storage) and out.report.startswith(storage)
    assert uri.is_dir(out.encoder_path) and uri.is_dir(out.model_path)
    assert out.model_uri.startswith("models:/llm2clip-tests-pipeline-model/")
    assert uri.is_file(uri.join(out.report, "results.json"))
    assert not (killed["root"] / "run" / "ray_results").exists() and not (killed["root"] / "run" / "evaluate").exists()


def test_the_model_loads_from_its_registry_uri_on_the_second_node(killed, second_node):
    """A worker on the node that shares no disk with the driver resolves models:/ through the MLflow
    server into its own node's cache, and the model it loads is the one train-clip published."""
    connect_here()

    @ray.remote(num_cpus=0.5, resources={second_node.resource: 1})
    def load(ref: str) -> tuple[str, str, int]:
        from pipeline.clip_model import LLM2CLIP
        from pipeline.model_refs import local_path

        model = LLM2CLIP.from_pretrained(ref)
        return ray.get_runtime_context().get_node_id(), local_path(ref), model.config.embed_dim

    node, path, dim = ray.get(load.remote("models:/llm2clip-tests-pipeline-model@candidate"))
    assert node == second_node.node_id() and node != ray.get_runtime_context().get_node_id()
    assert path.startswith(str(second_node.scratch)) and dim == 32
    assert not os.path.exists(path)  # on that node's disk only


def test_parent_run_holds_nested_stage_runs_and_the_lineage(killed, cluster):
    client = MlflowClient(cluster["MLFLOW_TRACKING_URI"])
    parent_id = killed["result"].mlflow_run_id
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags.get("mlflow.experimentKind") == "custom_model_development"
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    # one nested run per stage that ran, the killed train-clip's reopened, not doubled
    assert sorted(r.data.tags["mlflow.runName"] for r in children) == sorted(set(STAGES) - {"corpus"})  # corpus: not used
    lineage = json.loads(Path(client.download_artifacts(parent_id, "lineage.json", str(killed["root"]))).read_text())
    kinds = {n["kind"] for n in lineage["nodes"]}
    assert {"manifest", "captions", "embeddings", "encoder", "llm2clip", "report"} <= kinds
    out = killed["result"].handover
    produced_model = [e for e in lineage["edges"] if e["to"].startswith("llm2clip:")]
    assert f"embeddings:{out.encoder_version}" in {e["from"] for e in produced_model}
    comparison = json.loads(Path(client.download_artifacts(parent_id, "comparison.json", str(killed["root"]))).read_text())
    assert [row[0] for row in comparison["data"]] == ["llm (raw)", "llm (fine-tuned)", "llm2clip"]


@pytest.fixture(scope="module")
def rerun(killed, cluster):
    """The finished pipeline run again: it must do nothing."""
    client = MlflowClient(cluster["MLFLOW_TRACKING_URI"])
    versions = lambda name: sorted(v.version for v in client.search_model_versions(f"name='{name}'"))  # noqa: E731
    before = {n: versions(n) for n in ("llm2clip-tests-pipeline-encoder", "llm2clip-tests-pipeline-model")}
    out = run_job_here("jobs.pipeline", killed["config"], cluster, "--summary-json", str(killed["root"] / "run4.json"))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    after = {n: versions(n) for n in before}
    return before, after, load_result("jobs.pipeline", killed["root"] / "run4.json"), out.stdout


def test_a_finished_pipeline_does_nothing_and_registers_nothing(rerun, killed, cluster):
    before, after, result, stdout = rerun
    assert all(r.action == "skipped" for r in result.stages), result.stages
    assert before == after and all(after.values())  # registered once, by the run that trained
    assert result.handover == killed["result"].handover
    assert result.mlflow_run_id == killed["result"].mlflow_run_id  # the same parent run, reopened
    assert "| llm2clip |" in stdout  # the comparison table is printed again
    client = MlflowClient(cluster["MLFLOW_TRACKING_URI"])
    parent_id = result.mlflow_run_id
    comparison = json.loads(Path(client.download_artifacts(parent_id, "comparison.json", str(killed["root"] / "dl"))).read_text())
    assert len(comparison["data"]) == 3  # replaced, not appended to


def test_unrelated_data_in_the_stores_changes_no_plan(rerun, killed):
    """Another dataset, an evaluation set and a foreign caption version join the stores: every
    stage's plan (its output version and that it exists) stays as it was."""
    import pyarrow as pa

    from pipeline.captions import caption_rows
    from pipeline.store import Store, utc_now
    from schemas import STORE_SCHEMAS
    from tests.conftest import ingest_in_process

    config = killed["config"]
    before = [(p.stage, p.output, p.exists) for p, _ in plan_pipeline(load_config(config))]
    assert all(exists for _, _, exists in before)
    ingest_in_process(config, "ingest.dataset=other", "embedded.seed=7", "embedded.num_scenes=6")
    ingest_in_process(config, "ingest.dataset=eval-shapes", "embedded.seed=11", "embedded.num_scenes=4")
    rows = caption_rows("some-item", ["a note about something else"], "notes", "original", utc_now())
    Store(killed["store"], "captions").append("notes", pa.Table.from_pylist(rows, schema=STORE_SCHEMAS["captions"]))
    after = [(p.stage, p.output, p.exists) for p, _ in plan_pipeline(load_config(config))]
    assert after == before


def test_mlflow_review_in_a_real_browser(rerun, cluster, tmp_path):
    """The parent run as a reviewer sees it in MLflow's UI (headless Chromium): it opens on its
    runs, the stages are nested under it, the comparison table and a metric chart are shown."""
    from tests.browser import review_parent_run

    _, _, result, _ = rerun
    client = MlflowClient(cluster["MLFLOW_TRACKING_URI"])
    parent_id = result.mlflow_run_id
    experiment_id = client.get_run(parent_id).info.experiment_id
    shots = Path(os.environ.get("LLM2CLIP_SCREENSHOTS", tmp_path))
    (train,) = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent_id}' and tags.mlflow.runName = 'train-clip'")
    seen = review_parent_run(cluster["MLFLOW_TRACKING_URI"], experiment_id, parent_id, shots, metrics_run_id=train.info.run_id)
    assert seen.runs_view.workflow_type == "machine_learning" and seen.runs_view.heading == "Runs"
    ran = set(STAGES) - {"corpus"}
    assert ran <= set(seen.runs_expanded) and ran <= set(seen.child_runs)
    assert "comparison.json" in seen.artifacts and "lineage.json" in seen.artifacts
    assert seen.table_rows and {"llm (raw)", "llm (fine-tuned)", "llm2clip"} <= {r[0] for r in seen.table_rows}
    assert seen.metric_charts, "no metric chart drew a line"
    assert all(p.is_file() and p.stat().st_size > 10_000 for p in seen.screenshots.values())
