"""The KubeRay manifests of the scheduled refresh (cluster/kuberay/): pure YAML checks, no cluster.

They pin what a typo would silently break on a real cluster: the entrypoint and its config,
the Ray version against pyproject's pin, GPU and auth settings, the CronJob's wiring to the
ConfigMap / RBAC / RayJob labels, and deadlines that fit inside the schedule.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
KUBERAY = REPO / "cluster" / "kuberay"
RAYJOB_FILE = KUBERAY / "refresh-rayjob.yaml"
CRONJOB_FILE = KUBERAY / "refresh-cronjob.yaml"
CONFIGMAP = "llm2clip-refresh-rayjob"
REQUIRED_ENV = ("MLFLOW_TRACKING_URI", "LLM2CLIP_STORE_URI", "LLM2CLIP_LISTING", "LLM2CLIP_RUN_DIR", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


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
    for needle in ("jobDeploymentStatus", "jobStatus", "Complete", "Failed", "SUCCEEDED", "exit 1"):
        assert needle in script, needle


def test_install_commands_name_the_configmap():
    for path in (RAYJOB_FILE, CRONJOB_FILE):
        text = path.read_text()
        assert f"kubectl create configmap {CONFIGMAP}" in text, path
        assert f"--from-file={RAYJOB_FILE.name}=cluster/kuberay/{RAYJOB_FILE.name}" in text, path


def test_deadlines_fit_the_schedule(cron_docs, cron_env, rayjob):
    """RayJob deadline < the wait < the Job deadline < the period between runs."""
    spec = cron_docs["CronJob"]["spec"]
    minute, hour, *_ = spec["schedule"].split()
    m = re.fullmatch(r"\*/(\d+)", hour)
    assert minute.isdigit() and m, f"expected 'M */H * * *', got {spec['schedule']!r}"
    period = int(m.group(1)) * 3600
    wait = int(cron_env["WAIT_TIMEOUT_SECONDS"])
    job_deadline = spec["jobTemplate"]["spec"]["activeDeadlineSeconds"]
    assert rayjob["spec"]["activeDeadlineSeconds"] < wait < job_deadline < period
