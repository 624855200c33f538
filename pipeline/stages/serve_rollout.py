"""`serve-rollout`: move a RayService's search app to the version a model alias names now.

Run inside the Kubernetes cluster (cluster/kuberay/serve-rollout-cronjob.yaml): the alias is
resolved in MLflow (MLFLOW_TRACKING_URI and its credentials), the RayService is read and, when
its app is deployed with another version, patched (merge patch of spec.serveConfigV2) through
the Kubernetes API with the pod's ServiceAccount, which may get and patch that one RayService.
KubeRay then applies the new Serve config to the running cluster and Serve replaces the
replicas one by one. Rolling back is moving the alias back (or `--model models:/NAME/VERSION`).
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import sys
import urllib.request
from dataclasses import dataclass

from pipeline.model_refs import pin_alias
from pipeline.serve_rollout import app_model, rolled_serve_config

ACCOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"


@dataclass(frozen=True)
class Rollout:
    rayservice: str
    before: str | None
    after: str
    patched: bool


def _kubernetes(method: str, path: str, body: dict | None = None) -> dict:
    host = os.environ.get("KUBERNETES_SERVICE_HOST")
    if not host:
        raise RuntimeError("not in a Kubernetes pod (KUBERNETES_SERVICE_HOST is unset): run this as the CronJob")
    token = open(f"{ACCOUNT}/token").read().strip()
    request = urllib.request.Request(
        f"https://{host}:{os.environ.get('KUBERNETES_SERVICE_PORT', '443')}{path}", method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/merge-patch+json"})
    with urllib.request.urlopen(request, context=ssl.create_default_context(cafile=f"{ACCOUNT}/ca.crt"), timeout=30) as answer:
        return json.loads(answer.read())


def roll(namespace: str, rayservice: str, app: str, model: str, tracking_uri: str | None) -> Rollout:
    pinned = pin_alias(model, tracking_uri)
    path = f"/apis/ray.io/v1/namespaces/{namespace}/rayservices/{rayservice}"
    current = _kubernetes("GET", path)["spec"]["serveConfigV2"]
    rolled = rolled_serve_config(current, app, pinned)
    if rolled is not None:
        _kubernetes("PATCH", path, {"spec": {"serveConfigV2": rolled}})
    return Rollout(rayservice, app_model(current, app), pinned, rolled is not None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--namespace", default="llm2clip")
    parser.add_argument("--rayservice", default="llm2clip-search")
    parser.add_argument("--app", default="llm2clip-search", help="the Serve application's name (serve.app_name)")
    parser.add_argument("--model", default="models:/llm2clip-model@current", help="an alias to follow, or a version to pin")
    args = parser.parse_args(argv)
    done = roll(args.namespace, args.rayservice, args.app, args.model, os.environ.get("MLFLOW_TRACKING_URI"))
    what = f"rolled {done.before} -> {done.after}" if done.patched else f"already on {done.after}"
    print(f"{args.namespace}/{done.rayservice}: {what}", file=sys.stdout)
    return 0


if __name__ == "__main__":  # the CronJob's command: not a Ray job, so not under jobs/
    raise SystemExit(main())
