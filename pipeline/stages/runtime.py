"""Connecting a job to Ray: the running cluster when there is one, else a local Ray."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import ray

from pipeline.config import RayConfig

log = logging.getLogger(__name__)


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
    if any(k.startswith("RAY_AUTH") for k in env):
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
        ray.init(address=cfg.address, namespace=cfg.namespace, log_to_driver=True)
        return cfg.address
    if "RAY_ADDRESS" not in os.environ:
        # Join the project's local cluster if it is up; its env carries the auth token path.
        use_cluster_env(read_cluster_env(run_dir), override=False)
    if "RAY_ADDRESS" in os.environ:
        try:
            ray.init(address=os.environ["RAY_ADDRESS"], namespace=cfg.namespace)
            return os.environ["RAY_ADDRESS"]
        except ConnectionError as e:
            log.warning("no Ray cluster at %s (%s); starting a local Ray", os.environ["RAY_ADDRESS"], e)
            # A stale address must not leak into Ray's own local start.
            os.environ.pop("RAY_ADDRESS")
    return _start_local(cfg)


def _start_local(cfg: RayConfig) -> str:
    ray.init(num_cpus=cfg.local_num_cpus, namespace=cfg.namespace, include_dashboard=False)
    return ray.get_runtime_context().gcs_address
