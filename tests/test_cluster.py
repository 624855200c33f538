"""The local cluster: token auth on, unauthenticated submissions refused, `ray job submit` works."""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request

from pipeline.store import Store
from tests.conftest import REPO, job_env, write_config


def test_status_reports_both_services(cluster):
    out = subprocess.run([str(REPO / "cluster/local.sh"), "status"], env=job_env(cluster) | {
        "LLM2CLIP_RUN_DIR": cluster["LLM2CLIP_RUN_DIR"], "LLM2CLIP_RAY_PORT": cluster["RAY_ADDRESS"].split(":")[1],
        "LLM2CLIP_DASHBOARD_PORT": cluster["RAY_DASHBOARD_ADDRESS"].rsplit(":", 1)[1],
        "LLM2CLIP_MLFLOW_PORT": cluster["MLFLOW_TRACKING_URI"].rsplit(":", 1)[1]}, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ray: up at 127.0.0.1" in out.stdout and "mlflow: up at http://127.0.0.1" in out.stdout


def test_dashboard_requires_a_token(cluster):
    url = f"{cluster['RAY_DASHBOARD_ADDRESS']}/api/jobs/"
    try:
        urllib.request.urlopen(url, timeout=10)
        raise AssertionError("the jobs API answered without a token")
    except urllib.error.HTTPError as e:
        assert e.code == 401
    token = open(cluster["RAY_AUTH_TOKEN_PATH"]).read().strip()
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200


def _submit_echo(cluster, env):
    return subprocess.run(
        ["ray", "job", "submit", "--address", cluster["RAY_DASHBOARD_ADDRESS"], "--", "echo", "should-not-run"],
        env=env, capture_output=True, text=True, timeout=120,
    )


def test_unauthenticated_submit_is_refused(cluster, tmp_path):
    env = job_env(cluster)
    for key in ("RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN", "RAY_AUTH_MODE"):
        env.pop(key, None)
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token to fall back on
    out = _submit_echo(cluster, env)
    assert out.returncode != 0
    assert "AuthenticationError" in out.stderr + out.stdout
    assert "should-not-run" not in out.stdout


def test_wrong_token_is_refused(cluster, tmp_path):
    env = job_env(cluster)
    env.pop("RAY_AUTH_TOKEN_PATH")
    env.update(HOME=str(tmp_path), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 64)
    out = _submit_echo(cluster, env)
    assert out.returncode != 0
    assert "should-not-run" not in out.stdout
    assert "Unauthorized" in out.stderr + out.stdout or "AuthenticationError" in out.stderr + out.stdout


def test_ray_job_submit_runs_ingest(cluster, tmp_path, models):
    store = tmp_path / "store"
    config = write_config(tmp_path / "c.yaml", store, cluster)
    out = subprocess.run(
        [
            "ray", "job", "submit", "--address", cluster["RAY_DASHBOARD_ADDRESS"], "--working-dir", str(REPO),
            "--", "python", "-m", "jobs.ingest", "--config", str(config),
        ],
        cwd=REPO, env=job_env(cluster), capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "succeeded" in out.stdout + out.stderr
    manifest = Store(str(store), "manifest").read("embedded")
    assert manifest.num_rows >= 24
    lineage = Store(str(store), "manifest").lineage("embedded")[0]
    assert lineage.stage == "ingest" and lineage.code["source_sha256"]
    assert json.dumps(lineage.to_json())  # serialisable


def test_job_started_by_hand_joins_the_local_cluster(cluster, tmp_path, models):
    """No RAY_ADDRESS, no token variables: the job finds {run_dir}/cluster.env itself."""
    import sys

    config = write_config(tmp_path / "c.yaml", tmp_path / "store", cluster, run_dir=cluster["LLM2CLIP_RUN_DIR"])
    env = job_env(cluster)
    for key in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "LLM2CLIP_RUN_DIR"):
        env.pop(key, None)
    env["HOME"] = str(tmp_path)
    out = subprocess.run([sys.executable, "-m", "jobs.ingest", "--config", str(config)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"on Ray at {cluster['RAY_ADDRESS']}" in out.stdout
