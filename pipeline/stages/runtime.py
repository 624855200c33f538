"""Connecting a job to Ray: the running cluster when there is one, else a local Ray."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import ray

from pipeline.config import RayConfig, pool_bounds
from pipeline.faults import fault_env
from pipeline.uri import storage_env


def read_cluster_env(run_dir: str) -> dict[str, str]:
    """The variables `cluster/local.sh up` wrote to {run_dir}/cluster.env (empty if none)."""
    path = Path(run_dir) / "cluster.env"
    if not path.is_file():
        return {}
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("export ") and "=" in line:
            key, _, value = line[len("export ") :].partition("=")
            env[key.strip()] = value.strip()
    return env


def use_cluster_env(env: dict[str, str], override: bool = True) -> None:
    """Put a cluster's variables (address, token path) into this process's environment.

    Ray reads its auth mode when it is imported, so after changing RAY_AUTH_* we refresh
    its config and token cache, as Ray does itself when it turns token auth on.
    """
    for key, value in env.items():
        if override or key not in os.environ:
            os.environ[key] = value
    # Only before connecting: a connected process already holds its token, and the config of
    # its live core worker is not ours to reset.
    if any(k.startswith("RAY_AUTH") for k in env) and not ray.is_initialized():
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()


def connect(cfg: RayConfig, run_dir: str) -> str:
    """Initialise Ray for this process and return the address it joined.

    Inside `ray job submit`, RAY_ADDRESS is set by the job supervisor and we join that
    cluster. Started by hand from the repo, we join the local cluster that
    `cluster/local.sh up` recorded (with its auth token), or start a private local Ray.
    """
    if ray.is_initialized():
        return ray.get_runtime_context().gcs_address
    if cfg.address == "local":
        return _start_local(cfg)
    if cfg.address != "auto":
        ray.init(address=cfg.address, namespace=cfg.namespace, log_to_driver=True, runtime_env=worker_runtime_env())
        return cfg.address
    if "RAY_ADDRESS" not in os.environ:
        # Join the project's local cluster if it is up; its env carries the auth token path.
        env = read_cluster_env(run_dir)
        if env.get("RAY_ADDRESS") and _reachable(env["RAY_ADDRESS"]):
            use_cluster_env(env, override=False)
    address = os.environ.get("RAY_ADDRESS")
    if address:
        # ray.init retries a dead GCS for minutes; a quick probe fails fast instead.
        if not _reachable(address):
            raise ConnectionError(f"RAY_ADDRESS={address} does not answer; start the cluster (cluster/local.sh up) or unset RAY_ADDRESS")
        ray.init(address=address, namespace=cfg.namespace, runtime_env=worker_runtime_env())
        return address
    return _start_local(cfg)


def worker_runtime_env() -> dict | None:
    """What this job's workers and actors must see of the driver's environment: the storage
    settings it was given (AWS_*, AWS_ENDPOINT_URL, MLFLOW_TRACKING_URI...), so every node reads
    the same bucket, and armed fault-drill crash points. Ray workers see their node's
    environment, not the driver's. Also: no model-loading progress bars. Variables a submitted
    job's own runtime_env sets already reach them, and naming them again would be a conflict
    for Ray."""
    # Model loads in workers draw tqdm bars that Ray prints whenever it flushes them, often after
    # the job's own summary; the driver's setting, if any, wins.
    quiet = {"HF_HUB_DISABLE_PROGRESS_BARS": os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS", "1")}
    env = {**quiet, **storage_env(), **fault_env()}
    submitted = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}").get("runtime_env") or {}
    env = {k: v for k, v in env.items() if k not in (submitted.get("env_vars") or {})}
    return {"env_vars": env} if env else None


def actor_pool(size: int | tuple[int, int]) -> ray.data.ActorPoolStrategy:
    """Ray Data's pool for a configured size: fixed N, or autoscaling between [min, max]."""
    low, high = pool_bounds(size)
    return ray.data.ActorPoolStrategy(size=low) if low == high else ray.data.ActorPoolStrategy(min_size=low, max_size=high)


def _reachable(address: str, timeout: float = 2.0) -> bool:
    """True when something listens at host:port (ray:// and http:// prefixes allowed)."""
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not port.isdigit():
        return True  # not host:port (e.g. "auto"): let Ray decide
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            return True
    except OSError:
        return False


def _start_local(cfg: RayConfig) -> str:
    # With the dashboard: Ray Train frees the placement group of a run whose controller died (a
    # sweep's early-stopped trial) only after the State API, which the dashboard serves, says so.
    ray.init(num_cpus=cfg.local_num_cpus, namespace=cfg.namespace, include_dashboard=True, runtime_env=worker_runtime_env())
    return ray.get_runtime_context().gcs_address
