"""The KubeRay manifests of the scheduled refresh (cluster/kuberay/): pure YAML checks, no cluster.

They pin what a typo would silently break on a real cluster: the entrypoint and its config,
the Ray version against pyproject's pin, GPU and auth settings, the CronJob's wiring to the
ConfigMap / RBAC / RayJob labels, deadlines that fit inside the schedule and a wait that covers
every try of the RayJob. The CronJob's guard script runs here against a fake kubectl.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
KUBERAY = REPO / "cluster" / "kuberay"
RAYJOB_FILE = KUBERAY / "refresh-rayjob.yaml"
CRONJOB_FILE = KUBERAY / "refresh-cronjob.yaml"
CONFIGMAP = "llm2clip-refresh-rayjob"
REQUIRED_ENV = ("MLFLOW_TRACKING_URI", "LLM2CLIP_STORE_URI", "LLM2CLIP_STORAGE_URI", "LLM2CLIP_MODELS_URI", "LLM2CLIP_LISTING",
                "LLM2CLIP_RUN_DIR", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def load(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


@pytest.fixture(scope="module")
def rayjob() -> dict:
    (doc,) = load(RAYJOB_FILE)
    return doc


@pytest.fixture(scope="module")
def cron_docs() -> dict[str, dict]:
    docs = load(CRONJOB_FILE)
    kinds = [d["kind"] for d in docs]
    assert len(kinds) == len(set(kinds)), f"one object per kind expected, got {kinds}"
    return {d["kind"]: d for d in docs}


@pytest.fixture(scope="module")
def cron_pod(cron_docs) -> dict:
    return cron_docs["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]


@pytest.fixture(scope="module")
def cron_env(cron_pod) -> dict[str, str]:
    (container,) = cron_pod["containers"]
    return {e["name"]: e.get("value") for e in container["env"]}


def ray_pod_specs(rayjob: dict) -> dict[str, dict]:
    """Pod specs of the head and every worker group, by group name."""
    spec = rayjob["spec"]["rayClusterSpec"]
    pods = {"head": spec["headGroupSpec"]["template"]["spec"]}
    for group in spec["workerGroupSpecs"]:
        pods[group["groupName"]] = group["template"]["spec"]
    return pods


def pinned_ray_version() -> str:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = [m.group(1) for d in deps if (m := re.fullmatch(r"\s*ray(?:\[[^\]]*\])?\s*==\s*([\w.]+)\s*", d))]
    assert len(pins) == 1, f"expected one `ray[...]==X` pin in pyproject.toml, got {deps}"
    return pins[0]


def test_every_document_parses_with_kind_and_api_version():
    for path in (RAYJOB_FILE, CRONJOB_FILE):
        docs = load(path)
        assert docs, f"{path} holds no document"
        for doc in docs:
            assert isinstance(doc, dict) and doc.get("kind") and doc.get("apiVersion") and doc.get("metadata"), (path, doc)


def test_kinds_and_api_versions(rayjob, cron_docs):
    assert (rayjob["apiVersion"], rayjob["kind"]) == ("ray.io/v1", "RayJob")
    assert {k: d["apiVersion"] for k, d in cron_docs.items()} == {
        "ServiceAccount": "v1",
        "Role": "rbac.authorization.k8s.io/v1",
        "RoleBinding": "rbac.authorization.k8s.io/v1",
        "CronJob": "batch/v1",
    }


def test_one_namespace_everywhere(rayjob, cron_docs):
    namespaces = {d["metadata"].get("namespace") for d in [rayjob, *cron_docs.values()]}
    assert namespaces == {"llm2clip"}


def test_rayjob_uses_generate_name(rayjob):
    meta = rayjob["metadata"]
    assert meta.get("generateName", "").endswith("-"), "every run needs a fresh name: metadata.generateName"
    assert "name" not in meta, "a fixed name makes the second `kubectl create` fail"


def test_entrypoint_runs_refresh_with_a_repo_config(rayjob):
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "jobs.refresh"], argv
    assert argv.count("--config") == 1, argv
    config = argv[argv.index("--config") + 1]
    assert not Path(config).is_absolute(), "relative to the image WORKDIR (the repo root)"
    assert (REPO / config).is_file(), f"{config} is not in the repo"
    cfg = yaml.safe_load((REPO / config).read_text())
    assert cfg["ingest"]["source"], "refresh ingests from ingest.source"


def test_entrypoint_module_exists(rayjob):
    module = shlex.split(rayjob["spec"]["entrypoint"])[2]
    path = REPO.joinpath(*module.split(".")).with_suffix(".py")
    assert path.is_file(), f"{path.relative_to(REPO)} does not exist"


def test_ray_version_matches_pyproject_pin(rayjob):
    pin = pinned_ray_version()
    assert rayjob["spec"]["rayClusterSpec"]["rayVersion"] == pin
    version = re.compile(rf"(?<![\d.]){re.escape(pin)}(?![.\d])")  # 2.60.0, not 12.60.0 / 2.60.01
    pods = dict(ray_pod_specs(rayjob))
    if rayjob["spec"].get("submitterPodTemplate"):
        pods["submitter"] = rayjob["spec"]["submitterPodTemplate"]["spec"]
    for group, pod in pods.items():
        for c in pod["containers"]:
            tag = c["image"].rsplit("/", 1)[-1].partition(":")[2]
            assert version.search(tag), f"{group}: image {c['image']} does not carry Ray {pin} in its tag"


def test_ephemeral_cluster_with_deadlines(rayjob):
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    for key in ("ttlSecondsAfterFinished", "activeDeadlineSeconds"):
        assert isinstance(spec[key], int) and spec[key] > 0, key
    assert isinstance(spec["backoffLimit"], int) and spec["backoffLimit"] >= 0
    assert "clusterSelector" not in spec, "the refresh runs on its own cluster"


def test_token_auth(rayjob):
    assert rayjob["spec"]["rayClusterSpec"]["authOptions"]["mode"] == "token"


def test_head_does_no_work_and_workers_have_a_gpu(rayjob):
    spec = rayjob["spec"]["rayClusterSpec"]
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    for c in spec["headGroupSpec"]["template"]["spec"]["containers"]:
        assert "nvidia.com/gpu" not in (c.get("resources", {}).get("limits") or {})
    assert spec.get("enableInTreeAutoscaling") is True
    gpu_groups = []
    for group in spec["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], group["groupName"]
        limits = []
        for c in group["template"]["spec"]["containers"]:
            res = c.get("resources", {})
            limits.append(res.get("limits") or {})
            # Kubernetes: an extended resource's request, if given, must equal its limit.
            if "nvidia.com/gpu" in (res.get("requests") or {}):
                assert res["requests"]["nvidia.com/gpu"] == limits[-1].get("nvidia.com/gpu"), group["groupName"]
        if any(int(lim.get("nvidia.com/gpu", 0)) >= 1 for lim in limits):
            gpu_groups.append(group)
    assert gpu_groups, "no worker group requests nvidia.com/gpu"
    assert any(g["maxReplicas"] > g["minReplicas"] for g in gpu_groups), "GPU workers should autoscale"


def test_every_ray_container_has_the_pipeline_env(rayjob):
    for group, pod in ray_pod_specs(rayjob).items():
        for c in pod["containers"]:
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            missing = [k for k in REQUIRED_ENV if k not in env]
            assert not missing, f"{group}/{c['name']}: missing {missing}"
            assert env["HF_HUB_OFFLINE"] == "1" and env["TRANSFORMERS_OFFLINE"] == "1"
            # Kubernetes rejects non-string env values (an unquoted 1 is an int).
            assert all(isinstance(v, str) for v in env.values() if v is not None), f"{group}: quote env values"


def test_role_grants_rayjob_lifecycle(cron_docs):
    rules = cron_docs["Role"]["rules"]
    verbs = {v for r in rules if "ray.io" in r["apiGroups"] and "rayjobs" in r["resources"] for v in r["verbs"]}
    assert {"create", "get", "list", "watch", "delete"} <= verbs


def test_rbac_wiring(cron_docs, cron_pod):
    sa = cron_docs["ServiceAccount"]["metadata"]["name"]
    binding = cron_docs["RoleBinding"]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": cron_docs["Role"]["metadata"]["name"]}
    assert {"kind": "ServiceAccount", "name": sa, "namespace": "llm2clip"} in binding["subjects"]
    assert cron_pod["serviceAccountName"] == sa


def test_cronjob_schedule_and_policy(cron_docs):
    spec = cron_docs["CronJob"]["spec"]
    assert len(spec["schedule"].split()) == 5
    assert spec["concurrencyPolicy"] == "Forbid"
    assert isinstance(spec["startingDeadlineSeconds"], int) and spec["startingDeadlineSeconds"] > 0
    assert spec["successfulJobsHistoryLimit"] >= 1 and spec["failedJobsHistoryLimit"] >= 1
    assert spec["jobTemplate"]["spec"]["backoffLimit"] == 0, "a retried pod would create a second RayJob"
    assert spec["jobTemplate"]["spec"]["template"]["spec"]["restartPolicy"] == "Never"


def test_cronjob_creates_the_rayjob_from_the_configmap(cron_pod, cron_env, rayjob):
    volumes = {v["name"]: v for v in cron_pod["volumes"]}
    (container,) = cron_pod["containers"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    cm_volumes = [name for name, v in volumes.items() if v.get("configMap", {}).get("name") == CONFIGMAP]
    assert len(cm_volumes) == 1, f"no volume from ConfigMap {CONFIGMAP}"
    cm = volumes[cm_volumes[0]]["configMap"]
    path = next((i["path"] for i in cm.get("items", []) if i["key"] == RAYJOB_FILE.name), RAYJOB_FILE.name)
    assert cron_env["RAYJOB_MANIFEST"] == f"{mounts[cm_volumes[0]]}/{path}"
    script = " ".join(container.get("command", []) + container.get("args", []))
    assert re.search(r"kubectl create\b[^\n]*-f \"?\$RAYJOB_MANIFEST", script), "the RayJob must be created (generateName), not applied"
    assert "kubectl apply" not in script
    # The script finds its RayJobs by label and judges them by the RayJob status fields.
    key, _, value = cron_env["RAYJOB_SELECTOR"].partition("=")
    assert rayjob["metadata"]["labels"][key] == value
    for needle in ("jobDeploymentStatus", "jobStatus", "Complete", "Failed", "ValidationFailed", "Suspended", "SUCCEEDED", "exit 1"):
        assert needle in script, needle


def test_install_commands_name_the_configmap():
    for path in (RAYJOB_FILE, CRONJOB_FILE):
        text = path.read_text()
        assert f"kubectl create configmap {CONFIGMAP}" in text, path
        assert f"--from-file={RAYJOB_FILE.name}=cluster/kuberay/{RAYJOB_FILE.name}" in text, path


def test_deadlines_fit_the_schedule(cron_docs, cron_env, rayjob):
    """Every try of the RayJob (1 + backoffLimit, each up to its activeDeadlineSeconds) < the
    guard's wait < the Job deadline < the period between runs."""
    spec = cron_docs["CronJob"]["spec"]
    minute, hour, *_ = spec["schedule"].split()
    m = re.fullmatch(r"\*/(\d+)", hour)
    assert minute.isdigit() and m, f"expected 'M */H * * *', got {spec['schedule']!r}"
    period = int(m.group(1)) * 3600
    wait = int(cron_env["WAIT_TIMEOUT_SECONDS"])
    job_deadline = spec["jobTemplate"]["spec"]["activeDeadlineSeconds"]
    every_try = (1 + rayjob["spec"]["backoffLimit"]) * rayjob["spec"]["activeDeadlineSeconds"]
    assert every_try < wait < job_deadline < period, (every_try, wait, job_deadline, period)


# ---------------------------------------------------------------- the CronJob's guard, run against a fake kubectl
NEW_RAYJOB = "llm2clip-refresh-new"
#: Answers the guard's kubectl calls from FAKE_* variables and logs each call. FAKE_EXISTING lists
#: the RayJobs already there as name=jobDeploymentStatus; the one the guard creates is NEW_RAYJOB.
FAKE_KUBECTL = """#!/bin/sh
echo "$*" >>"$FAKE_LOG"
case "$*" in
  "create "*) echo "$FAKE_NEW" ;;
  "get rayjobs "*"-o name"*) for r in $FAKE_EXISTING; do echo "rayjob.ray.io/${r%%=*}"; done ;;
  "get rayjobs "*) for r in $FAKE_EXISTING; do echo "$r"; done ;;
  "get rayjob $FAKE_NEW "*jobDeploymentStatus*) printf %s "$FAKE_NEW_STATE" ;;
  "get rayjob "*jobStatus*) printf %s "$FAKE_JOB_STATUS" ;;
  "get rayjob "*reason*) printf %s "reason-of-$3" ;;
  "get rayjob "*message*) printf %s "message-of-$3" ;;
esac
"""


def run_guard(cron_pod: dict, tmp_path: Path, existing: str, new_state: str, job_status: str = "SUCCEEDED",
              wait: int = 600) -> tuple[subprocess.CompletedProcess, list[str]]:
    """The CronJob's script as its container runs it (sh -c), with kubectl on PATH faked."""
    (container,) = cron_pod["containers"]
    assert container["command"] == ["/bin/sh", "-c"]
    (script,) = container["args"]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "kubectl").write_text(FAKE_KUBECTL)
    (bin_dir / "kubectl").chmod(0o755)
    log = tmp_path / "kubectl.log"
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path), "TMPDIR": str(tmp_path),
           "NAMESPACE": "llm2clip", "RAYJOB_MANIFEST": str(RAYJOB_FILE), "RAYJOB_SELECTOR": "app.kubernetes.io/name=llm2clip-refresh",
           "WAIT_TIMEOUT_SECONDS": str(wait), "POLL_SECONDS": "1", "KEEP_RAYJOBS": "10",
           "FAKE_LOG": str(log), "FAKE_NEW": NEW_RAYJOB, "FAKE_EXISTING": existing, "FAKE_NEW_STATE": new_state,
           "FAKE_JOB_STATUS": job_status}
    done = subprocess.run(["/bin/sh", "-c", script], env=env, capture_output=True, text=True, timeout=60)
    return done, log.read_text().splitlines() if log.exists() else []


def test_guard_runs_past_rejected_and_suspended_rayjobs_and_reports_them(cron_pod, tmp_path):
    existing = "old-done=Complete old-failed=Failed old-rejected=ValidationFailed old-held=Suspended"
    done, calls = run_guard(cron_pod, tmp_path, existing, new_state="Complete")
    assert done.returncode == 0, done.stderr
    assert any(c.startswith("create ") for c in calls), calls
    assert "refresh: succeeded" in done.stdout
    for name, state in (("old-rejected", "ValidationFailed"), ("old-held", "Suspended")):
        assert f"rayjob/{name} is {state}: reason-of-{name} message-of-{name}" in done.stderr, done.stderr
    assert "old-done is" not in done.stderr and "old-failed is" not in done.stderr  # ordinary endings are not news


@pytest.mark.parametrize("state", ["", "New", "Initializing", "Running", "Retrying", "Suspending", "Waiting"])
def test_guard_does_not_start_beside_a_refresh_in_flight(cron_pod, tmp_path, state):
    done, calls = run_guard(cron_pod, tmp_path, f"old-done=Complete old-busy={state}", new_state="Complete")
    assert done.returncode == 1
    assert "not started, RayJob(s) still running: old-busy" in done.stderr, done.stderr
    assert not any(c.startswith("create ") for c in calls)


@pytest.mark.parametrize("state", ["ValidationFailed", "Suspended", "Failed"])
def test_guard_stops_waiting_when_its_rayjob_ends_without_running(cron_pod, tmp_path, state):
    """A RayJob that KubeRay rejected or that was suspended never finishes by itself: the guard
    reports it at once instead of waiting out WAIT_TIMEOUT_SECONDS (600 here; the test would time out)."""
    done, _ = run_guard(cron_pod, tmp_path, "", new_state=state, job_status="")
    assert done.returncode == 1
    assert f"rayjob/{NEW_RAYJOB} jobDeploymentStatus={state}" in done.stdout and "refresh: FAILED" in done.stderr


def test_guard_fails_when_the_wait_runs_out(cron_pod, tmp_path):
    done, _ = run_guard(cron_pod, tmp_path, "", new_state="Running", wait=1)
    assert done.returncode == 1 and f"rayjob/{NEW_RAYJOB} not finished after 1s" in done.stderr, done.stderr


def test_guard_fails_a_complete_rayjob_whose_ray_job_failed(cron_pod, tmp_path):
    done, _ = run_guard(cron_pod, tmp_path, "", new_state="Complete", job_status="FAILED")
    assert done.returncode == 1 and "refresh: FAILED" in done.stderr
