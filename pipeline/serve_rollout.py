"""Following a model alias on Kubernetes: the RayService's Serve config names a pinned model
version (`args.model: models:/NAME/VERSION`); when the alias has moved, the config is rewritten
with the new version and KubeRay applies it in place, which Ray Serve rolls out replica by
replica (the old ones answer until the new ones are healthy).

`rolled_serve_config` is the pure part (tested); `pipeline.stages.serve_rollout` reads and patches the
RayService through the Kubernetes API from inside the cluster (a CronJob,
cluster/kuberay/serve-rollout-cronjob.yaml).
"""

from __future__ import annotations

import yaml


def app_model(serve_config: str, app: str) -> str | None:
    """The model an application of a Serve config (serveConfigV2, YAML) is deployed with."""
    for entry in (yaml.safe_load(serve_config) or {}).get("applications", []):
        if entry.get("name") == app:
            return (entry.get("args") or {}).get("model")
    raise ValueError(f"the Serve config has no application {app!r}")


def rolled_serve_config(serve_config: str, app: str, model: str) -> str | None:
    """The Serve config with `app` deployed with `model`; None when it already is."""
    if app_model(serve_config, app) == model:
        return None
    config = yaml.safe_load(serve_config)
    for entry in config["applications"]:
        if entry.get("name") == app:
            entry.setdefault("args", {})["model"] = model
    return yaml.safe_dump(config, sort_keys=False)
