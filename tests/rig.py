"""The test rig of issue 32: object storage and a second Ray node that shares no disk with the
head, on this one machine. tests/conftest.py wraps these in the fixtures `s3` and `second_node`.

- `S3Server`: moto's standalone server on loopback. Clients talk HTTP to it with the variables
  of `env` (nothing is patched, nothing is put in this process's environment).
- `SecondNode`: a Ray node joined to the test cluster's head by `cluster/local.sh node-up`,
  inside a private mount namespace where the head's run dir and the repository's `.run/` are
  empty, with its own temp dir and its own scratch (a tmpfs only that node sees), no AWS_* in its
  environment, and a custom resource (`resource`) that places work on it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = REPO / ".venv" / "bin"


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except OSError:
        return False


class S3Server:
    """An S3-protocol server at 127.0.0.1:`port` (moto keeps its objects in memory)."""

    def __init__(self, port: int, proc: subprocess.Popen | None):
        self.port = port
        self.proc = proc  # None: a server that was already running, left alone at the end
        self.endpoint = f"http://127.0.0.1:{port}"
        # What a process needs to reach the server (moto takes any credentials). A job is given
        # these; its workers get them only if the job hands them on (runtime_env).
        self.env = {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",  # no instance-metadata lookups off this machine
        }

    def client(self):
        """A boto3 S3 client for this server (configured explicitly, not from the environment)."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"], region_name=self.env["AWS_REGION"])

    def bucket(self, name: str) -> str:
        """Bucket `name` (3 to 63 characters), created if missing; returns the name."""
        client = self.client()
        if name not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
            client.create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every key of `bucket` under `prefix`."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def stop(self) -> None:
        """Stop the server if this process started it."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


def start_s3(port: int, log_path: Path, timeout: float = 30) -> S3Server:
    """moto_server on 127.0.0.1:`port`, or the one already answering there."""
    endpoint = f"http://127.0.0.1:{port}/"
    if _answers(endpoint):
        return S3Server(port, None)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        # Its own session: stop() ends it and anything it started.
        proc = subprocess.Popen([str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    while not _answers(endpoint):
        if proc.poll() is not None or time.monotonic() > deadline:
            S3Server(port, proc).stop()
            raise RuntimeError(f"moto_server on port {port} did not come up: {log_path.read_text()[-2000:]}")
        time.sleep(0.2)
    return S3Server(port, proc)


class SecondNode:
    """The second Ray node (see the module's docstring). This process must be a driver of the
    cluster (`ray.nodes()` is how it tells whether the node is alive).

    `run(action)` runs `cluster/local.sh ACTION` for the test cluster and this node."""

    resource = "node2"  # the custom resource it has 100 of: resources={"node2": 1} places work there

    def __init__(self, run: Callable[[str], subprocess.CompletedProcess], node_dir: Path, hidden: list[Path]):
        self._run = run
        self.dir = node_dir
        self.temp_dir = node_dir / "tmp"  # its Ray temp dir (session, logs): visible from the head, for debugging
        self.scratch = node_dir / "scratch"  # LLM2CLIP_RUN_DIR of its processes: a tmpfs the head sees empty
        self.hidden = hidden  # empty on that node
        self._node_id: str | None = None

    def _local_sh(self, action: str) -> str:
        out = self._run(action)
        assert out.returncode == 0, f"cluster/local.sh {action}: {out.stdout}{out.stderr}"
        return out.stdout

    def _alive_nodes(self) -> list[dict]:
        import ray

        return [n for n in ray.nodes() if n["Alive"] and self.resource in n.get("Resources", {})]

    def start(self, timeout: float = 120) -> str:
        """Start the node (a fresh one, empty disk, after a kill: what is left of the old one is
        stopped first) unless it runs; wait until the cluster has it; return its node id."""
        import ray

        # A node that runs already is the one we want; else the one that joins after node-up.
        known = set() if self._run("node-status").returncode == 0 else {n["NodeID"] for n in ray.nodes()}
        self._local_sh("node-up")
        deadline = time.monotonic() + timeout
        while True:
            alive = [n["NodeID"] for n in self._alive_nodes() if n["NodeID"] not in known]
            if alive:
                self._node_id = alive[0]
                return self._node_id
            if time.monotonic() > deadline:
                raise TimeoutError(f"the second node did not join within {timeout:.0f} s; see {self.dir}/start.log")
            time.sleep(0.5)

    def node_id(self) -> str:
        """The Ray node id of the node this object last started."""
        assert self._node_id, "the second node was not started"
        return self._node_id

    def alive(self) -> bool:
        """Whether the cluster (its GCS) counts the node as alive: after a raylet kill this turns
        False only once the head's health checks have given up on it (~15 s here)."""
        return any(n["NodeID"] == self._node_id for n in self._alive_nodes())

    def raylet_pid(self) -> int | None:
        out = self._run("node-status")
        return int(out.stdout.split("raylet ")[1].split(",")[0]) if out.returncode == 0 else None

    def kill_raylet(self) -> int:
        """SIGKILL the node's raylet (the kill drill): its workers and agents die with it, the
        node's scratch is lost. Returns the raylet's pid."""
        pid = self.raylet_pid()
        assert pid, "the second node has no raylet"
        self._local_sh("node-kill-raylet")
        return pid

    def wait_dead(self, timeout: float = 120) -> None:
        """Until the cluster counts the node as dead."""
        deadline = time.monotonic() + timeout
        while self.alive():
            if time.monotonic() > deadline:
                raise TimeoutError(f"the cluster still counts node {self._node_id} as alive after {timeout:.0f} s")
            time.sleep(0.5)

    def restart(self, timeout: float = 120) -> str:
        """Stop what is left of the node, start a fresh one; its new node id."""
        self._local_sh("node-down")
        return self.start(timeout)

    def stop(self) -> None:
        self._local_sh("node-down")
