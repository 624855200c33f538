"""The test rig itself (tests/rig.py, issue 32): MLflow's artifacts land in the S3 server's bucket
through the tracking server; the second Ray node's workers run in its private mount namespace
(the head's run dir and the repository's .run/ empty, its scratch its own), get no storage
settings but those a job hands them, and the node can be killed and brought back."""

from __future__ import annotations

import os
import time

import pytest
import ray
from mlflow.tracking import MlflowClient

from tests.conftest import MLFLOW_BUCKET, REPO, TEST_RUN_DIR

pytestmark = pytest.mark.timeout(300)


def _gone(pid: int) -> bool:
    """No such process, or a zombie nobody reaped yet."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_mlflow_artifacts_go_through_the_server_to_the_bucket(cluster, s3, tmp_path):
    client = MlflowClient(cluster["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("llm2clip-tests-rig")
    run = client.create_run(experiment.experiment_id if experiment else client.create_experiment("llm2clip-tests-rig"))
    (tmp_path / "probe.txt").write_text("rig artifact")
    client.log_artifact(run.info.run_id, str(tmp_path / "probe.txt"), "rig")
    client.set_terminated(run.info.run_id)
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")  # clients go through the server
    back = client.download_artifacts(run.info.run_id, "rig/probe.txt", str(tmp_path / "back"))
    assert open(back).read() == "rig artifact"
    assert any(k.endswith(f"{run.info.run_id}/artifacts/rig/probe.txt") for k in s3.keys(MLFLOW_BUCKET))


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
    # No storage settings of its own (the raylet has no AWS_*): only what this driver's job hands
    # on, which has no endpoint or credentials here (this process has none; the s3 fixture sets none).
    raylet_env = open(f"/proc/{raylet}/environ", "rb").read().split(b"\0")
    assert not [v for v in raylet_env if v.startswith(b"AWS_")], raylet_env
    assert not {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & set(seen["aws"]), seen["aws"]


def test_a_job_hands_its_workers_on_the_second_node_the_storage_settings(second_node, s3):
    bucket = s3.bucket("rig-probe")
    s3.client().put_object(Bucket=bucket, Key="probe/hello.txt", Body=b"hello from the bucket")

    @ray.remote(num_cpus=0.1, resources={second_node.resource: 1})
    def read(uri: str) -> tuple[str, str | None, bytes]:
        import pyarrow.fs

        fs, path = pyarrow.fs.FileSystem.from_uri(uri)
        with fs.open_input_stream(path) as f:
            return ray.get_runtime_context().get_node_id(), os.environ.get("AWS_ENDPOINT_URL"), f.read()

    node, endpoint, data = ray.get(read.options(runtime_env={"env_vars": s3.env}).remote(f"s3://{bucket}/probe/hello.txt"))
    assert node == second_node.node_id() and endpoint == s3.endpoint and data == b"hello from the bucket"


def test_the_second_node_dies_with_its_raylet_and_comes_back(second_node):
    """The kill drill's tools: SIGKILL the raylet, the cluster counts the node dead, a fresh node joins."""
    old = second_node.node_id()
    pid = second_node.kill_raylet()
    started = time.monotonic()
    second_node.wait_dead(timeout=120)
    print(f"node counted dead {time.monotonic() - started:.1f} s after its raylet was killed")
    assert _gone(pid) and not second_node.alive()
    assert [n["Alive"] for n in ray.nodes() if n["NodeID"] == old] == [False]
    new = second_node.start()
    assert new != old and second_node.alive()
    (node,) = [n for n in ray.nodes() if n["NodeID"] == new]
    assert node["Resources"][second_node.resource] == 100 and node["Resources"]["CPU"] == 2

    @ray.remote(num_cpus=0.1, resources={second_node.resource: 1})
    def where() -> str:
        return ray.get_runtime_context().get_node_id()

    assert ray.get(where.remote()) == new
