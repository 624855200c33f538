"""Shared fixtures: a real local Ray cluster (token auth) and MLflow server on their own
ports, so a developer's demo cluster is left alone, and the prepared models."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
RUN_DIR = Path(os.environ.get("LLM2CLIP_RUN_DIR", REPO / ".run")).resolve()
MODELS_DIR = RUN_DIR / "models"
TEST_RUN_DIR = Path(os.environ.get("LLM2CLIP_TEST_RUN_DIR", RUN_DIR / "test")).resolve()
# LLM2CLIP_TEST_PORTS="ray,dashboard,mlflow,client,agent" gives a second test session its own cluster.
PORTS = dict(zip(("LLM2CLIP_RAY_PORT", "LLM2CLIP_DASHBOARD_PORT", "LLM2CLIP_MLFLOW_PORT", "LLM2CLIP_CLIENT_PORT", "LLM2CLIP_AGENT_PORT"),
                 os.environ.get("LLM2CLIP_TEST_PORTS", "6390,8275,5010,9011,52375").split(",")))
# The rig (tests/rig.py): the S3 server's port (LLM2CLIP_TEST_S3_PORT, by default as far from 9320
# as the Ray port is from 6390, so a session with its own ports has its own server too), the
# bucket of MLflow's artifacts, and the second node's folder (outside every hidden path).
S3_PORT = int(os.environ.get("LLM2CLIP_TEST_S3_PORT", 9320 + int(PORTS["LLM2CLIP_RAY_PORT"]) - 6390))
MLFLOW_BUCKET = "mlflow"
NODE_DIR = Path(f"/tmp/llm2clip-node2-{PORTS['LLM2CLIP_RAY_PORT']}")

# Image-mode recaption with the tiny random Idefics3: its random words are kept (loose
# rules), the point is the plumbing: bytes -> actor -> processor -> vLLM -> store.
TINY_VLM_RECAPTION = {
    "mode": "image",
    "model": str(MODELS_DIR / "tiny-idefics3"),
    "prompt": "Describe this image in detail.",
    "sampling": {"max_tokens": 24},
    # Random weights write random words: keep them, the test is about plumbing.
    "postprocess": {"unfinished": "keep", "min_words": 1, "max_compression_ratio": 20},
    "kv_cache_bytes": 256 * 2**20,
    "max_model_len": 1024,
    "actors": 1,
    "batch_size": 16,
}


@pytest.fixture(scope="session")
def models() -> dict[str, Path]:
    from pipeline.model_zoo import prepare

    return prepare(MODELS_DIR, tiny=True)


def _cluster_cmd(action: str, **extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **PORTS, "LLM2CLIP_RUN_DIR": str(TEST_RUN_DIR), **extra}
    for key in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH", "MLFLOW_TRACKING_URI"):
        env.pop(key, None)
    return subprocess.run([str(REPO / "cluster/local.sh"), action], env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="session")
def s3():
    """The rig's S3-protocol server on loopback (tests/rig.py `S3Server`): `.env` (AWS_* to hand
    a job), `.bucket(name)`, `.keys(bucket, prefix)`, `.client()`, `.endpoint`. Started here
    (stopped at the end) unless one answers on S3_PORT already."""
    from tests.rig import start_s3

    server = start_s3(S3_PORT, TEST_RUN_DIR / "s3" / f"moto-{S3_PORT}.log")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def cluster(s3):
    """The local cluster (Ray head + MLflow server, its artifacts in the rig's bucket s3://mlflow);
    started here, stopped at the end if we started it. Its Ray processes have no AWS_*."""
    started = _cluster_cmd("status").returncode != 0
    if not started and s3.proc is not None:
        # A kept cluster's MLflow registry names artifacts in an S3 server whose memory is gone.
        _cluster_cmd("down")
        started = True
    if started:
        shutil.rmtree(TEST_RUN_DIR / "mlflow", ignore_errors=True)  # runs whose artifacts were in a gone server
    s3.bucket(MLFLOW_BUCKET)
    if started:
        # The MLflow server alone gets the storage settings: clients reach artifacts through it. A
        # node that dies is counted dead in ~3 s instead of ~15 s (the kill drill waits for it).
        up = _cluster_cmd("up", **s3.env, LLM2CLIP_MLFLOW_ARTIFACTS=f"s3://{MLFLOW_BUCKET}",
                          RAY_health_check_period_ms="1000", RAY_health_check_failure_threshold="3")
        assert up.returncode == 0, up.stdout + up.stderr
    env_file = TEST_RUN_DIR / "cluster.env"
    from pipeline.stages.runtime import read_cluster_env

    env = read_cluster_env(str(TEST_RUN_DIR))
    assert env, f"cluster/local.sh wrote no {env_file}"
    # The tests are clients of the rig's storage, as a user's shell is: the jobs they start get
    # these settings, and hand them to their workers (runtime_env), whose nodes have none.
    os.environ.update(s3.env)
    yield env
    import ray

    if ray.is_initialized():
        ray.shutdown()
    if started and not os.environ.get("LLM2CLIP_KEEP_TEST_CLUSTER"):
        _cluster_cmd("down")


@pytest.fixture(scope="session")
def ray_session(cluster):
    """This test process as a driver of the local cluster."""
    saved = {k: os.environ.get(k) for k in cluster}
    connect_here(cluster)
    yield cluster
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def second_node(cluster, ray_session):
    """A second Ray node (tests/rig.py `SecondNode`), for the module that asks for it only, so no
    other test's work lands there. No disk shared with the head: TEST_RUN_DIR, the repository's
    .run/ and RUN_DIR are empty there. API: `.resource` ("node2": resources={"node2": 1} places
    work there), `.node_id()`, `.alive()`, `.kill_raylet()`, `.wait_dead()`, `.start()` (after a
    kill), `.restart()`, `.scratch` (its processes' LLM2CLIP_RUN_DIR), `.dir`, `.hidden`."""
    from tests.rig import SecondNode

    hidden = list(dict.fromkeys([TEST_RUN_DIR, REPO / ".run", RUN_DIR]))
    extra = {"LLM2CLIP_NODE_DIR": str(NODE_DIR), "LLM2CLIP_NODE_HIDE": " ".join(map(str, hidden))}
    node = SecondNode(lambda action: _cluster_cmd(action, **extra), NODE_DIR, hidden)
    node.start()
    yield node
    node.stop()


def job_env(cluster: dict[str, str]) -> dict[str, str]:
    """Environment of a job process started by a test: the cluster's, with the venv first."""
    env = {**os.environ, **cluster}
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def write_config(path: Path, store: Path, cluster: dict[str, str], **sections) -> Path:
    """A small config: the embedded default scaled down, stores under `store`."""
    data = {
        "run_dir": str(path.parent / "run"),
        "store": {"uri": str(store)},
        "ray": {"address": "auto"},
        "mlflow": {"enabled": True, "tracking_uri": cluster["MLFLOW_TRACKING_URI"], "experiment": "llm2clip-tests"},
        "models": {"dir": str(MODELS_DIR), "llm": str(MODELS_DIR / "smollm2-135m-instruct")},
        "embedded": {"num_scenes": 24, "seed": 0, "image_size": 64, "paraphrases": 2, "samples": True},
        "ingest": {"source": "embedded", "dataset": "embedded", "batch_size": 16},
    }
    for name, values in sections.items():
        if isinstance(values, dict):
            data.setdefault(name, {}).update(values)
        else:
            data[name] = values
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run_job(module: str, config: Path, cluster: dict[str, str], *extra: str, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", module, "--config", str(config), *extra]
    return subprocess.run(cmd, cwd=REPO, env=job_env(cluster), capture_output=True, text=True, timeout=timeout)


def connect_here(cluster: dict[str, str] | None = None) -> None:
    """This test process as a driver of the test cluster, before anything here uses Ray: Ray
    Data in an unconnected process starts a private local Ray instead (and a test file run on
    its own then drove two clusters)."""
    import ray

    from pipeline.stages.runtime import read_cluster_env, use_cluster_env

    if ray.is_initialized():
        return
    env = cluster or read_cluster_env(str(TEST_RUN_DIR))
    assert env, "the test cluster is not up: use the cluster fixture"
    use_cluster_env(env)
    from pipeline.stages.runtime import worker_runtime_env

    ray.init(address=env["RAY_ADDRESS"], namespace="llm2clip-tests", log_to_driver=False, runtime_env=worker_runtime_env())


def run_job_here(module: str, config: Path, cluster: dict[str, str], *extra: str) -> subprocess.CompletedProcess:
    """A job's `main` in this test process, a driver of the test cluster already: for runs whose
    point is what the job does, not its process (a fresh interpreter's imports cost ~15 s here)."""
    import contextlib
    import importlib
    import io

    connect_here(cluster)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = importlib.import_module(module).main(["--config", str(config), *extra])
    return subprocess.CompletedProcess([module, *extra], rc, out.getvalue(), err.getvalue())


def load_result(module: str, path: Path):
    """The result a job wrote with --summary-json, as the job's result type (`main.result_type`)."""
    import importlib
    import json

    from pipeline.records import from_json

    return from_json(importlib.import_module(module).main.result_type, json.loads(Path(path).read_text()))


def run_stage_here(module: str, config: Path, cluster: dict[str, str], *extra: str):
    """`run_stage` in this process (see `run_job_here`)."""
    path = config.parent / f"summary-{module.rsplit('.', 1)[-1]}-here-{len(list(config.parent.glob('summary-*')))}.json"
    out = run_job_here(module, config, cluster, "--summary-json", str(path), *extra)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    return load_result(module, path)


def run_stage(module: str, config: Path, cluster: dict[str, str], *extra: str, timeout: int = 900):
    """Run a job that must succeed; return its result (written with --summary-json, read back as its type)."""
    path = config.parent / f"summary-{module.rsplit('.', 1)[-1]}-{os.getpid()}-{len(list(config.parent.glob('summary-*')))}.json"
    out = run_job(module, config, cluster, "--summary-json", str(path), *extra, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    return load_result(module, path)


@contextlib.contextmanager
def changed_since_ingest(uri: str):
    """An image file whose bytes changed after ingest, restored afterwards (the tests share the files)."""
    original = Path(uri).read_bytes()
    Path(uri).write_bytes(b"not the ingested bytes")
    try:
        yield
    finally:
        Path(uri).write_bytes(original)


def wait_until(condition: Callable[[], object], timeout: float, what: str, proc: subprocess.Popen | None = None, every: float = 0.2):
    """Poll `condition` until it returns something true (returned), or fail after `timeout`
    seconds naming `what`; a job `proc` that ends meanwhile fails at once, with its output."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        assert proc is None or proc.poll() is None, job_output(proc)
        time.sleep(every)
    raise TimeoutError(f"{what} within {timeout:.0f} s")


def wait_for_free_cpus(timeout: float = 120) -> None:
    """Until every CPU of the test cluster is free again: a killed job's workers and actors are gone."""
    import ray

    connect_here()
    wait_until(lambda: ray.available_resources().get("CPU", 0) >= ray.cluster_resources().get("CPU", 0) - 1e-6, timeout,
               "the killed job's workers did not free their CPUs")


def ingest_in_process(config: Path, *overrides: str) -> None:
    """Input preparation in the test process (the ingest job itself is tested elsewhere)."""
    from pipeline.config import load_config
    from pipeline.stages.ingest import run_ingest
    from pipeline.stages.tracking import Tracker

    connect_here()
    run_ingest(load_config(config, list(overrides)), Tracker(None, None))


def start_job(module: str, config: Path, cluster: dict[str, str], **env: str) -> subprocess.Popen:
    """A job in its own session (so the test can kill it and its workers); its summary goes to
    CONFIG.json, its output to CONFIG.log (a pipe nobody reads would fill and block the job).
    `env`: more variables (a fault drill's crash points)."""
    log = open(str(config) + ".log", "w")  # noqa: SIM115 - the child holds it; closed when the test process ends
    proc = subprocess.Popen([sys.executable, "-m", module, "--config", str(config), "--summary-json", str(config) + ".json"],
                            cwd=REPO, env={**job_env(cluster), **env}, stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    proc.log_path = Path(log.name)
    return proc


def job_output(proc: subprocess.Popen, chars: int = 4000) -> str:
    """The end of what a job started by `start_job` printed."""
    return proc.log_path.read_text(errors="replace")[-chars:]


def registered_step(results: str | Path, run_prefix: str) -> int:
    """The step of the latest checkpoint Ray Train has registered (its snapshot on storage, a
    local folder or a URI): files alone do not count until every rank's report was collected."""
    import json

    from pipeline import uri

    best = 0
    for found in uri.list_files(str(results)):
        relative = found.path.rsplit("/", 2)[-2:]
        if len(relative) < 2 or relative[1] != "checkpoint_manager_snapshot.json" or not relative[0].startswith(run_prefix):
            continue
        try:
            latest = json.loads(uri.read_text(uri.uri_of(str(results), found.path))).get("latest_checkpoint_result") or {}
            best = max(best, int(latest.get("metrics", {}).get("step", 0)))
        except (OSError, ValueError):
            pass
    return best


def crash_job(module: str, config: Path, cluster: dict[str, str], points: list[str], fired: Path) -> str:
    """A job armed with crash points (`pipeline.faults`; each fires once across processes, its
    marker in `fired`): waits until one of them has killed the driver, checks that every point
    fired, and returns the job's output."""
    proc = start_job(module, config, cluster, LLM2CLIP_CRASH_AT=",".join(points), LLM2CLIP_CRASH_ONCE_DIR=str(fired))
    assert proc.wait(timeout=600) == -signal.SIGKILL, job_output(proc)  # a crash point killed the driver
    for point in points:
        assert (fired / point.split("@")[0].split(":")[0]).is_file(), f"{point} did not fire"
    return job_output(proc, 10**8)  # all of it


def wait_for_checkpoint(results: str | Path, run_prefix: str, proc: subprocess.Popen, at_least: int, timeout: float = 300) -> int:
    return wait_until(lambda: (step := registered_step(results, run_prefix)) >= at_least and step, timeout,
                      f"no checkpoint of step {at_least} or later was registered", proc)


# ---------------------------------------------------------------- train-clip and sweep inputs
CLIP_TINY = {
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
CLIP_MODELS = {"dir": str(MODELS_DIR), "llm": str(MODELS_DIR / "tiny-llama"), "vision": str(MODELS_DIR / "tiny-clip-vision"),
               "clip_text": str(MODELS_DIR / "tiny-clip-text")}


def clip_config(root: Path, cluster, name: str, sweep: dict | None = None, **train_clip) -> Path:
    """A train-clip (and sweep) config on the store of `clip_store` under `root`."""
    return write_config(root / f"{name}.yaml", root / "store", cluster, models=CLIP_MODELS, embedded={"num_scenes": 60, "image_size": 64},
                        embed={"actors": 1, "batch_size": 64, "cra_split": None}, train_clip={**CLIP_TINY, **train_clip},
                        **({"sweep": sweep} if sweep else {}))


@pytest.fixture(scope="session")
def clip_store(tmp_path_factory, cluster, models, ray_session):
    """The embedded default (60 scenes + 10 photos) ingested and embedded by the tiny Llama:
    what train-clip and sweep tests train on."""
    from pipeline.config import load_config
    from pipeline.stages.embed import run_embed
    from pipeline.stages.tracking import Tracker

    root = tmp_path_factory.mktemp("train-clip")
    config = clip_config(root, cluster, "prep")
    ingest_in_process(config)
    run_embed(load_config(config), Tracker(None, None))
    return root
