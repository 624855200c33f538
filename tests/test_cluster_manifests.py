"""Everything under cluster/ that a real cluster reads: the KubeRay RayCluster, RayJobs, MLflow and
storage manifests, the AWS cluster-launcher config, the runtime envs and the image recipe, plus the
job commands in runbook.md. Pure YAML/text checks, no cluster and no Ray import.

They pin what a typo would only reveal on a cluster: an entrypoint naming a job or config that does
not exist, a job without a RayJob, two image tags or a Ray version other than pyproject's pin, a
cluster or job without token auth, a dashboard or MLflow exposed beyond the cluster network, MLflow
without authentication, storage locations that differ between the pods that share them or a disk
shared between nodes (only the bucket and MLflow are shared), an image that is not pinned, and a
job whose demand (the config it runs, with its --set overrides) the cluster it gets cannot hold.
(tests/test_kuberay_manifests.py covers the scheduled refresh's RayJob and CronJob in depth.)
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import tomllib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pytest
import yaml

from pipeline.config import PIPELINE_STAGES as CONFIG_STAGES
from pipeline.config import PipelineConfig, load_config, pool_bounds

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
RAYCLUSTER_FILE = KUBERAY / "raycluster.yaml"
MLFLOW_FILE = KUBERAY / "mlflow.yaml"
STORAGE_FILE = KUBERAY / "storage.yaml"
REFRESH_FILE = KUBERAY / "refresh-rayjob.yaml"
LAUNCHER_FILE = CLUSTER / "launcher" / "aws.yaml"
PAPER_CONFIG = REPO / "configs" / "llama3-8b-eva02.yaml"
NAMESPACE = "llm2clip"
MLFLOW_SECRET = "llm2clip-mlflow"

#: Every job module in jobs/ (issue 20 adds `pipeline`); each needs a RayJob.
EXPECTED_JOBS = ("ingest", "recaption", "embed", "corpus", "finetune_text", "train_clip", "evaluate", "sweep", "refresh", "pipeline",
                 "export", "serve")
PIPELINE_STAGES = ("ingest", "recaption", "embed", "corpus", "finetune-text", "embed-finetuned", "train-clip", "evaluate", "sweep")
COMMON_FLAGS = {"--config", "--set", "--validate-only", "--summary-json", "--help"}
JOB_FLAGS = {job: set(COMMON_FLAGS) for job in EXPECTED_JOBS}
JOB_FLAGS["refresh"] |= {"--status"}
JOB_FLAGS["pipeline"] |= {"--from", "--until", "--dry-run"}
RAY_CONTAINER_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "LLM2CLIP_STORE_URI",
                     "LLM2CLIP_STORAGE_URI", "LLM2CLIP_MODELS_URI", "LLM2CLIP_LISTING", "LLM2CLIP_RUN_DIR", "HF_HOME",
                     "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


# ---------------------------------------------------------------- helpers
def load(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def yaml_files() -> list[Path]:
    return sorted(p for p in CLUSTER.rglob("*") if p.suffix in (".yaml", ".yml"))


def k8s_files() -> list[Path]:
    return sorted(KUBERAY.rglob("*.yaml"))


def k8s_docs() -> list[tuple[Path, dict]]:
    return [(path, doc) for path in k8s_files() for doc in load(path)]


def one(kind: str, path: Path) -> dict:
    docs = [d for d in load(path) if d["kind"] == kind]
    assert len(docs) == 1, f"{path.name}: expected one {kind}, got {len(docs)}"
    return docs[0]


def rayjobs() -> list[tuple[Path, dict]]:
    return [(p, d) for p, d in k8s_docs() if d.get("kind") == "RayJob"]


def pod_specs(doc: dict) -> dict[str, dict]:
    """Pod specs of an object, by role (head, worker group names, submitter, ...)."""
    kind, spec = doc.get("kind"), doc.get("spec") or {}
    pods: dict[str, dict] = {}
    if kind == "RayJob":
        if spec.get("submitterPodTemplate"):
            pods["submitter"] = spec["submitterPodTemplate"]["spec"]
        spec = spec.get("rayClusterSpec") or {}
        kind = "RayCluster" if spec else None
    if kind == "RayService":
        spec, kind = spec["rayClusterConfig"], "RayCluster"
    if kind == "RayCluster":
        pods["head"] = spec["headGroupSpec"]["template"]["spec"]
        for group in spec.get("workerGroupSpecs", []):
            pods[group["groupName"]] = group["template"]["spec"]
    elif kind in ("Deployment", "Job", "StatefulSet"):
        pods[kind.lower()] = spec["template"]["spec"]
    elif kind == "CronJob":
        pods["cronjob"] = spec["jobTemplate"]["spec"]["template"]["spec"]
    return pods


def all_pods() -> list[tuple[str, dict]]:
    return [(f"{path.name}:{role}", pod) for path, doc in k8s_docs() for role, pod in pod_specs(doc).items()]


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def mounts_by_claim(pod: dict) -> dict[str, list[str]]:
    """claimName -> mount paths of that claim in every container of the pod."""
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod.get("volumes", []) if "persistentVolumeClaim" in v}
    found: dict[str, list[str]] = {}
    for c in pod.get("containers", []):
        for m in c.get("volumeMounts", []):
            if m["name"] in claims:
                found.setdefault(claims[m["name"]], []).append(m["mountPath"])
    return found


def ray_containers() -> list[tuple[str, dict]]:
    """Containers that run Ray: every head/worker container of the RayCluster and of RayJobs with their own cluster."""
    out = []
    for path, doc in k8s_docs():
        if doc.get("kind") in ("RayCluster", "RayService") or (doc.get("kind") == "RayJob" and doc["spec"].get("rayClusterSpec")):
            for role, pod in pod_specs(doc).items():
                if role != "submitter":
                    out += [(f"{path.name}:{role}/{c['name']}", c) for c in pod["containers"]]
    return out


def pinned_ray_version() -> str:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = [m.group(1) for d in deps if (m := re.fullmatch(r"\s*ray(?:\[[^\]]*\])?\s*==\s*([\w.]+)\s*", d))]
    assert len(pins) == 1, f"expected one `ray[...]==X` pin in pyproject.toml, got {deps}"
    return pins[0]


def version_re(pin: str) -> re.Pattern:
    return re.compile(rf"(?<![\d.]){re.escape(pin)}(?![.\d])")  # 2.60.0, not 12.60.0 / 2.60.01


def entrypoint_argv(rayjob: dict) -> list[str]:
    return shlex.split(rayjob["spec"]["entrypoint"])


def job_of(rayjob: dict) -> str:
    argv = entrypoint_argv(rayjob)
    assert argv[:2] == ["python", "-m"] and argv[2].startswith("jobs."), f"entrypoint {argv} is not `python -m jobs.NAME`"
    return argv[2].removeprefix("jobs.")


def config_default(value: str) -> str:
    """`${VAR:-default}` -> default (the value a config falls back to)."""
    m = re.fullmatch(r"\$\{\w+:-([^}]*)\}(.*)", value)
    return (m.group(1) + m.group(2)) if m else value


@pytest.fixture(scope="module")
def raycluster() -> dict:
    return one("RayCluster", RAYCLUSTER_FILE)


@pytest.fixture(scope="module")
def launcher() -> dict:
    (cfg,) = load(LAUNCHER_FILE)
    return cfg


@pytest.fixture(scope="module")
def launcher_env(launcher) -> dict[str, str]:
    """The environment file every node writes in setup_commands (`printf 'export %s\\n' K=V ... > FILE`)."""
    cmds = [c for c in launcher["setup_commands"] if "printf 'export %s\\n'" in c]
    assert len(cmds) == 1, "one setup command must write the node environment file"
    body, _, target = cmds[0].rpartition(">")
    pairs = shlex.split(body.split("printf 'export %s\\n'", 1)[1])
    env = dict(p.split("=", 1) for p in pairs)
    env["__file__"] = target.strip()
    return env


@pytest.fixture(scope="module")
def mlflow_deployment() -> dict:
    return one("Deployment", MLFLOW_FILE)


@pytest.fixture(scope="module")
def mlflow_service() -> dict:
    return one("Service", MLFLOW_FILE)


# ---------------------------------------------------------------- every file
def test_every_yaml_under_cluster_parses():
    files = yaml_files()
    assert LAUNCHER_FILE in files and RAYCLUSTER_FILE in files and MLFLOW_FILE in files
    for path in files:
        docs = load(path)
        assert docs, f"{path.relative_to(REPO)} holds no document"
        assert all(isinstance(d, dict) for d in docs), path


def test_kubernetes_objects_have_kind_api_version_name_and_namespace():
    for path, doc in k8s_docs():
        where = f"{path.relative_to(REPO)}: {doc.get('kind')}"
        assert doc.get("apiVersion") and doc.get("kind"), where
        meta = doc.get("metadata") or {}
        assert meta.get("name") or meta.get("generateName"), f"{where} has neither metadata.name nor generateName"
        if doc["kind"] != "Namespace":
            assert meta.get("namespace") == NAMESPACE, f"{where}: namespace {meta.get('namespace')!r}"


# ---------------------------------------------------------------- the AWS cluster launcher
def test_launcher_required_fields(launcher):
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type", "max_workers"):
        assert launcher.get(key), key
    assert launcher["provider"]["type"] == "aws" and launcher["provider"].get("region")
    types = launcher["available_node_types"]
    assert launcher["head_node_type"] in types
    for name, node in types.items():
        assert "resources" in node and node["node_config"].get("InstanceType") and node["node_config"].get("ImageId"), name
        if name != launcher["head_node_type"]:
            assert 0 <= node.get("min_workers", 0) <= node["max_workers"], name
    assert sum(n.get("min_workers", 0) for k, n in types.items() if k != launcher["head_node_type"]) <= launcher["max_workers"]


def test_launcher_matches_rays_own_schema(launcher):
    spec = importlib.util.find_spec("ray")
    if spec is None or not spec.origin:
        pytest.skip("ray is not installed")
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((Path(spec.origin).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(launcher, schema)


def test_launcher_head_does_no_work_gpu_and_cpu_workers_autoscale(launcher):
    types = launcher["available_node_types"]
    head = types[launcher["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU")
    head_start = " ".join(launcher["head_start_ray_commands"])
    assert "--num-cpus=0" in head_start
    workers = {k: v for k, v in types.items() if k != launcher["head_node_type"]}
    gpu = {k: v for k, v in workers.items() if v["resources"].get("GPU", 0) >= 1}
    cpu = {k: v for k, v in workers.items() if not v["resources"].get("GPU") and v["resources"].get("CPU", 0) >= 1}
    assert gpu and cpu, "need GPU workers (vLLM, embedding, training) and CPU workers (image decoding)"
    for name, node in gpu.items():
        assert re.match(r"(p\d|g\d)", node["node_config"]["InstanceType"]), f"{name}: not a GPU instance type"
    assert all(v["max_workers"] > v.get("min_workers", 0) for v in workers.values()), "workers should scale"


def test_launcher_token_auth_everywhere(launcher, launcher_env):
    assert launcher_env["RAY_AUTH_MODE"] == "token"
    token = PurePosixPath(launcher_env["RAY_AUTH_TOKEN_PATH"].replace("$HOME", "~"))
    assert token.parent.as_posix() in launcher["file_mounts"], "the token's folder must be file-mounted to every node"
    env_file = launcher_env["__file__"]
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in launcher[key] if "ray start" in c]
        assert starts, key
        for c in starts:
            assert c.index(f". {env_file}") < c.index("ray start"), f"{key}: `ray start` without the token env"


def test_launcher_dashboard_stays_private(launcher):
    head_start = " ".join(launcher["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start, "dashboard / jobs API: loopback only (ray dashboard tunnels to it)"
    assert "0.0.0.0" not in " ".join(c for c in launcher["head_start_ray_commands"] if "ray start" in c)
    for rule in launcher["provider"].get("security_group", {}).get("IpPermissions", []):
        public = any(r.get("CidrIp") == "0.0.0.0/0" for r in rule.get("IpRanges", []))
        assert not (public and rule.get("FromPort") != 22), f"public inbound rule {rule}"


def test_launcher_mlflow_runs_with_basic_auth(launcher, launcher_env):
    server = [c for c in launcher["head_start_ray_commands"] if "mlflow server" in c]
    assert len(server) == 1 and "--app-name basic-auth" in server[0]
    assert "admin_password" in server[0] and "MLFLOW_AUTH_CONFIG_PATH" in server[0]
    port = re.search(r"mlflow server .*--port (\d+)", server[0]).group(1)
    worker_start = " ".join(launcher["worker_start_ray_commands"])
    assert f"MLFLOW_TRACKING_URI=http://$RAY_HEAD_IP:{port}" in worker_start
    assert "mlflow.env" in worker_start, "workers need the MLflow credentials"


# ---------------------------------------------------------------- jobs and RayJobs
def test_every_job_has_exactly_one_rayjob():
    on_disk = {p.stem for p in (REPO / "jobs").glob("*.py")} - {"__init__"}
    assert on_disk == set(EXPECTED_JOBS), f"jobs/ holds {sorted(on_disk)}; update EXPECTED_JOBS and add RayJobs"
    by_job: dict[str, list[str]] = {}
    for path, doc in rayjobs():
        by_job.setdefault(job_of(doc), []).append(path.name)
    assert set(by_job) == set(EXPECTED_JOBS), f"missing RayJobs: {sorted(set(EXPECTED_JOBS) - set(by_job))}"
    assert all(len(v) == 1 for v in by_job.values()), by_job


def test_entrypoints_name_a_job_module_and_a_config_that_exist():
    for path, doc in rayjobs():
        argv = entrypoint_argv(doc)
        job = job_of(doc)
        assert (REPO / "jobs" / f"{job}.py").is_file(), f"{path.name}: jobs/{job}.py does not exist"
        assert argv.count("--config") == 1, f"{path.name}: {argv}"
        config = argv[argv.index("--config") + 1]
        assert not Path(config).is_absolute() and (REPO / config).is_file(), f"{path.name}: config {config} is not in the repo"
        flags = {a.split("=", 1)[0] for a in argv[3:] if a.startswith("--")}
        assert flags <= JOB_FLAGS[job], f"{path.name}: unknown flags {sorted(flags - JOB_FLAGS[job])}"


def test_stage_rayjobs_run_on_the_raycluster_with_its_token(raycluster):
    name = raycluster["metadata"]["name"]
    selector_jobs = [(p, d) for p, d in rayjobs() if p.parent.name == "jobs"]
    assert {job_of(d) for _, d in selector_jobs} == set(EXPECTED_JOBS) - {"refresh"}
    for path, doc in selector_jobs:
        spec, meta = doc["spec"], doc["metadata"]
        assert spec["clusterSelector"] == {"ray.io/cluster": name}, path.name
        # KubeRay rejects or mishandles these in clusterSelector mode (a retry would delete the shared cluster).
        for key in ("rayClusterSpec", "shutdownAfterJobFinishes", "suspend", "backoffLimit"):
            assert key not in spec, f"{path.name}: {key} does not belong to a clusterSelector RayJob"
        assert meta.get("generateName", "").endswith("-") and "name" not in meta, f"{path.name}: use generateName"
        assert spec["submissionMode"] == "K8sJobMode"
        assert isinstance(spec["activeDeadlineSeconds"], int) and spec["activeDeadlineSeconds"] > 0
        (submitter,) = spec["submitterPodTemplate"]["spec"]["containers"]
        env = env_of(submitter)
        assert env["RAY_AUTH_MODE"]["value"] == "token", path.name
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": name, "key": "auth_token"}, path.name
        assert spec["submitterPodTemplate"]["spec"]["restartPolicy"] == "Never"


def test_token_auth_on_every_ray_cluster(raycluster):
    assert raycluster["spec"]["authOptions"]["mode"] == "token"
    for path, doc in rayjobs():
        if doc["spec"].get("rayClusterSpec"):
            assert doc["spec"]["rayClusterSpec"]["authOptions"]["mode"] == "token", path.name


def test_raycluster_head_does_no_work_and_groups_autoscale(raycluster):
    spec = raycluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    for c in spec["headGroupSpec"]["template"]["spec"]["containers"]:
        assert "nvidia.com/gpu" not in (c.get("resources", {}).get("limits") or {})
    gpu, cpu = [], []
    for group in spec["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], group["groupName"]
        assert group["maxReplicas"] > group["minReplicas"], f"{group['groupName']} should autoscale"
        (c,) = group["template"]["spec"]["containers"]
        res = c["resources"]
        assert res["requests"] == res["limits"], f"{group['groupName']}: requests must equal limits"
        (gpu if int(res["limits"].get("nvidia.com/gpu", 0)) >= 1 else cpu).append(group["groupName"])
    assert gpu and cpu, "need a GPU worker group and a CPU worker group"


def test_images_are_one_tag_carrying_the_pinned_ray(raycluster, launcher):
    pin = pinned_ray_version()
    images = {}
    for where, pod in all_pods():
        if where.endswith(":cronjob"):  # the refresh scheduler: a kubectl image, no Ray
            continue
        for c in pod["containers"]:
            images.setdefault(c["image"], []).append(f"{where}/{c['name']}")
    assert len(images) == 1, f"more than one image: {images}"
    (image,) = images
    assert launcher["docker"]["image"] == image, "the launcher's nodes must run the KubeRay image"
    tag = image.rsplit("/", 1)[-1].partition(":")[2]
    assert version_re(pin).search(tag), f"image {image} does not carry Ray {pin} in its tag"
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert tag.startswith(f"{version}-"), f"image {image}: the tag starts with the project version {version} (a release, a tag)"
    assert raycluster["spec"]["rayVersion"] == pin
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^FROM\s+(\S+)", dockerfile, re.M).group(1)
    assert base.startswith("rayproject/ray:") and version_re(pin).search(base.partition(":")[2]), base
    assert f"ray.__version__ != '{pin}'" in dockerfile, "the image build checks Ray's version"
    assert any(f"ray.__version__ != '{pin}'" in c for c in launcher["setup_commands"]), "the launcher checks the node's Ray"
    assert "-t " + image in dockerfile, "the Dockerfile's build command names the manifests' image"


def image_references() -> list[tuple[Path, str]]:
    """(file, image) for every image named under cluster/: any `image` / `*_image` key in the YAML
    (pod containers and initContainers, the launcher's docker section) and the Dockerfile's FROM."""
    found = []

    def walk(path: Path, node) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if (k == "image" or k.endswith("_image")) and isinstance(v, str):
                    found.append((path, v))
                else:
                    walk(path, v)
        elif isinstance(node, list):
            for v in node:
                walk(path, v)

    for path in yaml_files():
        for doc in load(path):
            walk(path, doc)
    for path in CLUSTER.rglob("Dockerfile*"):
        found += [(path, m.group(1)) for m in re.finditer(r"^FROM\s+(\S+)", path.read_text(), re.M)]
    return found


def test_every_image_is_pinned():
    """By digest, or by an exact version tag that its file documents as pinned: never :latest, never
    untagged (both move under a running cluster, and `bitnami/kubectl:latest` stopped existing)."""
    refs = image_references()
    assert len({p for p, _ in refs}) >= 4, refs
    for path, image in refs:
        where = f"{path.relative_to(REPO)}: {image}"
        name, _, digest = image.partition("@")
        if digest:
            assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest), where
            continue
        tag = name.rsplit("/", 1)[-1].partition(":")[2]
        assert tag, f"{where}: untagged (means :latest)"
        assert tag != "latest" and re.search(r"\d+\.\d+", tag), f"{where}: not an exact version tag"
        assert re.search(r"#[^\n]*\bpinned\b", path.read_text(), re.I), f"{where}: say in a comment that the tag is pinned"


def test_nothing_is_exposed_beyond_the_cluster_network():
    for path, doc in k8s_docs():
        kind, spec = doc["kind"], doc.get("spec") or {}
        assert kind not in ("Ingress", "Route", "Gateway"), f"{path.name}: {kind}"
        if kind == "Service":
            assert spec.get("type", "ClusterIP") == "ClusterIP", f"{path.name}: Service type {spec.get('type')}"
        cluster = (spec if kind == "RayCluster" else spec.get("rayClusterSpec") if kind == "RayJob"
                   else spec.get("rayClusterConfig") if kind == "RayService" else None)
        if cluster:
            head = cluster["headGroupSpec"]
            assert head.get("serviceType", "ClusterIP") == "ClusterIP", f"{path.name}: head serviceType"
            assert not head.get("enableIngress"), f"{path.name}: enableIngress"
    for where, pod in all_pods():
        assert not pod.get("hostNetwork"), where
        for c in pod["containers"]:
            assert not any("hostPort" in p for p in c.get("ports", [])), f"{where}: hostPort"


# ---------------------------------------------------------------- scheduling: every job fits the cluster it gets
# For every manifest that runs Ray work, the config its job loads (with the manifest's --set
# overrides) must be schedulable on the nodes the manifest declares at their largest: otherwise
# the job waits for resources that never come, until its deadline (issue 32: a refresh cluster
# of 4 GPUs and fixed pools of 8 one-GPU actors). Pools are checked at their minimum size: an
# autoscaling pool [min, max] starts with min actors and grows only as far as the cluster allows.

#: Kinds that start no Ray work, so there is nothing of theirs to place.
NO_RAY_WORK = {"Namespace", "ServiceAccount", "Role", "RoleBinding", "PersistentVolumeClaim", "Deployment", "Service",
               "NetworkPolicy", "ConfigMap", "Secret"}
#: The stages of each single-stage job (jobs.refresh and jobs.pipeline: `job_stages`).
SINGLE_STAGE_JOBS = {"ingest": "ingest", "recaption": "recaption", "embed": "embed", "corpus": "corpus",
                     "finetune_text": "finetune-text", "train_clip": "train-clip", "evaluate": "evaluate", "sweep": "sweep",
                     "export": "export", "serve": "serve"}


@dataclass(frozen=True)
class NodeGroup:
    """Nodes of one shape: the Ray resources each offers, and how many there can be at once."""

    name: str
    count: int
    resources: dict[str, float]


@dataclass(frozen=True)
class Demand:
    """`count` bundles of Ray resources that a stage holds at the same time."""

    what: str
    count: int
    bundle: dict[str, float]


def cpu_quantity(value: str | int | float) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def ray_node_groups(cluster_spec: dict) -> list[NodeGroup]:
    """The nodes of a RayCluster spec as KubeRay starts Ray on them: CPUs and GPUs from the Ray
    container's limits unless rayStartParams sets num-cpus / num-gpus, custom resources from
    rayStartParams.resources; workers up to maxReplicas."""
    groups = [("head", 1, cluster_spec["headGroupSpec"])]
    groups += [(g["groupName"], g["maxReplicas"], g) for g in cluster_spec.get("workerGroupSpecs", [])]
    out = []
    for name, count, group in groups:
        container = group["template"]["spec"]["containers"][0]  # KubeRay runs Ray in the first container
        limits = container.get("resources", {}).get("limits", {})
        params = group.get("rayStartParams") or {}
        resources = {"CPU": float(params.get("num-cpus", cpu_quantity(limits.get("cpu", 0)))),
                     "GPU": float(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))}
        if "resources" in params:  # KubeRay's format: a JSON object inside a quoted string, '"{\\"name\\": 1}"'
            resources |= json.loads(params["resources"].strip().strip("'\"").replace('\\"', '"'))
        out.append(NodeGroup(name, count, resources))
    return out


def launcher_node_groups(launcher: dict) -> list[NodeGroup]:
    head = launcher["head_node_type"]
    return [NodeGroup(name, 1 if name == head else min(node["max_workers"], launcher["max_workers"]),
                      {k: float(v) for k, v in node["resources"].items()})
            for name, node in launcher["available_node_types"].items()]


def bundle(cpus: float, gpus: float, custom: dict[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in {"CPU": cpus, "GPU": gpus, **custom}.items() if v}


def actor_pool(what: str, section) -> Demand:
    low, _ = pool_bounds(section.actors)
    return Demand(f"{what} actor", low, bundle(section.cpus_per_actor, section.gpus_per_actor, section.resources_per_actor))


def train_workers(what: str, t) -> Demand:
    return Demand(f"{what} worker", t.num_workers, bundle(t.cpus_per_worker, 1 if t.use_gpu else 0, t.resources_per_worker))


#: Ray Data reading and decoding images beside a stage's workers (ingest; train-clip's per-epoch stream).
DATA_TASK = Demand("Ray Data read task", 1, {"CPU": 1.0})


def stage_steps(cfg: PipelineConfig, stage: str) -> list[list[Demand]]:
    """What a stage holds at once, per step (its steps run one after the other). Recaption reads
    images in zero-CPU tasks and embed materialises its input before its actors start, so
    neither needs a CPU beside its actors."""
    if stage in ("ingest", "export"):  # export: Ray Data joins, then one CPU task per shard it writes
        return [[DATA_TASK]]
    if stage in ("recaption", "corpus"):  # corpus: text-mode passes of the recaption engine
        return [[actor_pool("recaption", cfg.recaption)]]
    if stage in ("embed", "embed-finetuned"):
        return [[actor_pool("embed", cfg.embed)]]
    if stage == "finetune-text":
        return [[train_workers("finetune_text", cfg.finetune_text)]]
    if stage == "train-clip":
        return [[train_workers("train_clip", cfg.train_clip), DATA_TASK]]
    if stage == "evaluate":
        return [[actor_pool("evaluate", cfg.evaluate)]]
    if stage == "sweep":  # pipeline/stages/sweep.py: trial_resources, features.compute_features
        sw, tc = cfg.sweep, cfg.train_clip
        workers = sw.workers_per_trial or (1 if sw.mode == "cheap" else tc.num_workers)
        cpus = sw.cpus_per_trial_worker if sw.mode == "cheap" else tc.cpus_per_worker
        trial = Demand("sweep trial worker", workers, bundle(cpus, 1 if tc.use_gpu else 0, tc.resources_per_worker))
        if sw.mode == "cheap":
            return [[Demand("sweep feature actor", pool_bounds(sw.feature_actors)[0], {"CPU": 1.0})], [trial]]
        return [[trial, DATA_TASK]]
    if stage == "serve":  # pipeline/stages/serve.py: the index (image_index.build_index), then the app's replicas
        sc = cfg.serve
        index = [Demand("serve index actor", pool_bounds(sc.index_actors)[0], bundle(sc.index_cpus, sc.index_gpus, {}))]
        if sc.action != "deploy":
            return [index]
        replicas = [Demand(f"serve {name} replica", d.replicas, bundle(d.cpus, d.gpus, d.resources))
                    for name, d in (("ClipTowers", sc.clip_deployment), ("LlmEncoder", sc.text_deployment))]
        return [index, [*replicas, Demand("serve SearchApi replica", sc.api_replicas, {"CPU": sc.api_cpus})]]
    raise AssertionError(f"no demand known for stage {stage}: add it to stage_steps")


def job_stages(job: str, cfg: PipelineConfig) -> list[str]:
    if job == "refresh":  # pipeline/stages/refresh.py
        return [s for s, on in (("ingest", cfg.refresh.ingest), ("recaption", True), ("embed", cfg.refresh.embed)) if on]
    if job == "pipeline":  # pipeline/stages/pipeline.py: selected(), and the sweep only when asked
        first = CONFIG_STAGES.index(cfg.pipeline.from_stage) if cfg.pipeline.from_stage else 0
        last = CONFIG_STAGES.index(cfg.pipeline.until_stage) if cfg.pipeline.until_stage else len(CONFIG_STAGES) - 1
        return [s for s in CONFIG_STAGES[first:last + 1] if s != "sweep" or cfg.pipeline.sweep]
    return [SINGLE_STAGE_JOBS[job]]


def job_config(argv: list[str]) -> tuple[str, PipelineConfig]:
    """(job, config) of `python -m jobs.NAME --config FILE [--set k=v ...] [--from S] [--until S]`,
    loaded as the job loads it (pipeline.config.load_config applies the --set overrides)."""
    assert argv[:2] == ["python", "-m"] and argv[2].startswith("jobs."), argv
    config, overrides = None, []
    args = iter(argv[3:])
    for arg in args:
        flag, eq, value = arg.partition("=")
        if flag in ("--config", "--set", "--from", "--until") and not eq:
            value = next(args)
        if flag == "--config":
            config = value
        elif flag == "--set":
            overrides.append(value)
        elif flag in ("--from", "--until"):
            overrides.append(f"pipeline.{flag[2:]}_stage={value}")
    return argv[2].removeprefix("jobs."), load_config(REPO / config, overrides)


def unplaced(step: list[Demand], groups: list[NodeGroup]) -> list[str]:
    """The bundles of `step` that find no node on the cluster at its largest (first fit, largest
    bundle first; one bundle on one node, as Ray places an actor or a worker): [] if all fit."""
    nodes = [dict(g.resources) for g in groups for _ in range(g.count)]
    wanted = sorted(((d.what, d.bundle) for d in step for _ in range(d.count)),
                    key=lambda w: (-w[1].get("GPU", 0), -w[1].get("CPU", 0)))
    missing = []
    for what, need in wanted:
        node = next((free for free in nodes if all(free.get(k, 0) >= v - 1e-9 for k, v in need.items())), None)
        if node is None:
            missing.append(f"{what} {need}")
            continue
        for k, v in need.items():
            node[k] -= v
    return missing


def scheduling_problems(argv: list[str], groups: list[NodeGroup]) -> list[str]:
    job, cfg = job_config(argv)
    problems = []
    for stage in job_stages(job, cfg):
        for step in stage_steps(cfg, stage):
            missing = unplaced(step, groups)
            if missing:
                wanted = ", ".join(f"{d.count} x {d.what} {d.bundle}" for d in step)
                nodes = ", ".join(f"{g.count} x {g.name} {g.resources}" for g in groups)
                left = ", ".join(f"{n} x {w}" for w, n in Counter(missing).items())
                problems.append(f"jobs.{job} / {stage}: needs {wanted}; the cluster has at most {nodes}; no room for {left}")
    return problems


def scheduling_cases() -> list[tuple[str, list[str], list[NodeGroup]]]:
    """(where, entrypoint argv, the nodes it gets) for every manifest under cluster/ that runs Ray work."""
    docs = k8s_docs()
    clusters = {d["metadata"]["name"]: d for _, d in docs if d["kind"] == "RayCluster"}

    def rayjob_case(where: str, doc: dict) -> tuple[str, list[str], list[NodeGroup]]:
        spec = doc["spec"]
        cluster = spec.get("rayClusterSpec") or clusters[spec["clusterSelector"]["ray.io/cluster"]]["spec"]
        return (where, entrypoint_argv(doc), ray_node_groups(cluster))

    cases = []
    every_job = [entrypoint_argv(d) for _, d in docs if d["kind"] == "RayJob"]
    for path, doc in docs:
        kind, where = doc["kind"], str(path.relative_to(CLUSTER))
        if kind == "RayJob":
            cases.append(rayjob_case(where, doc))
        elif kind == "CronJob":  # it creates the RayJob of the file in its ConfigMap (refresh-rayjob.yaml), if any
            pod = doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
            files = [i["key"] for v in pod.get("volumes", []) if "configMap" in v for i in v["configMap"]["items"]]
            for name in files:
                cases.append(rayjob_case(f"{where} -> {name}", one("RayJob", KUBERAY / name)))
        elif kind == "RayCluster":  # a long-lived cluster: the jobs that select it (runbook.md submits the same by hand)
            name = doc["metadata"]["name"]
            argvs = [entrypoint_argv(d) for _, d in docs
                     if d["kind"] == "RayJob" and d["spec"].get("clusterSelector", {}).get("ray.io/cluster") == name]
            cases += [(where, argv, ray_node_groups(doc["spec"])) for argv in argvs]
        elif kind == "RayService":  # each Serve application, as jobs.serve deploys it (index, then replicas)
            for entry in yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"]:
                args = entry["args"]
                argv = ["python", "-m", "jobs.serve", "--config", args["config"],
                        *[a for o in [*args.get("set", []), f"serve.model={args['model']}"] for a in ("--set", o)]]
                cases.append((f"{where}:{entry['name']}", argv, ray_node_groups(doc["spec"]["rayClusterConfig"])))
        else:  # any new kind that runs Ray needs its demand added here
            assert kind in NO_RAY_WORK, f"{where}: {kind} is not covered by the scheduling check"
    (launcher,) = load(LAUNCHER_FILE)  # runbook.md submits every job's command to it with `ray job submit`
    cases += [(str(LAUNCHER_FILE.relative_to(CLUSTER)), argv, launcher_node_groups(launcher)) for argv in every_job]
    return cases


@pytest.mark.parametrize("where, argv, groups", [pytest.param(*c, id=f"{c[0]}:{c[1][2]}") for c in scheduling_cases()])
def test_every_job_fits_the_cluster_its_manifest_declares(where, argv, groups):
    problems = scheduling_problems(argv, groups)
    assert not problems, f"{where}: " + "\n".join(problems)


def test_the_fit_check_rejects_a_fixed_pool_larger_than_the_cluster():
    """The refresh cluster (at most 4 one-GPU workers) cannot hold 8 fixed one-GPU engines."""
    argv, groups = next((a, g) for w, a, g in scheduling_cases() if w == str(REFRESH_FILE.relative_to(CLUSTER)))
    assert not scheduling_problems(argv, groups)
    problems = scheduling_problems([*argv, "--set", "recaption.actors=8"], groups)
    assert len(problems) == 1 and "jobs.refresh / recaption" in problems[0] and "4 x recaption actor" in problems[0], problems
    assert scheduling_problems([*argv, "--set", "recaption.actors=[4, 8]"], groups) == []
    assert scheduling_problems([*argv, "--set", "recaption.resources_per_actor={gpu-h100: 1}"], groups)  # no node offers it


# ---------------------------------------------------------------- MLflow
def test_mlflow_server_runs_basic_auth_with_credentials_from_a_secret(mlflow_deployment):
    pod = mlflow_deployment["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    script = " ".join(c.get("command", []) + c.get("args", []))
    script = script.replace("\\\n", " ")
    assert re.search(r"mlflow server\b[^\n]*--app-name basic-auth", script), "mlflow server --app-name basic-auth"
    env = env_of(c)
    for key in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert env[key]["valueFrom"]["secretKeyRef"]["name"] == MLFLOW_SECRET, key
    assert "admin_password = $MLFLOW_AUTH_ADMIN_PASSWORD" in script
    assert "--allowed-hosts" in script, "MLflow refuses Host headers that are not localhost / private IPs"
    assert mlflow_deployment["spec"]["replicas"] == 1 and mlflow_deployment["spec"]["strategy"]["type"] == "Recreate"


def test_every_ray_container_logs_to_that_mlflow_with_its_credentials(mlflow_deployment, mlflow_service):
    (server,) = mlflow_deployment["spec"]["template"]["spec"]["containers"]
    admin = env_of(server)
    svc, port = mlflow_service["metadata"]["name"], mlflow_service["spec"]["ports"][0]["port"]
    script = " ".join(server["args"])
    assert f"--port {port}" in script or mlflow_service["spec"]["ports"][0]["targetPort"] in ("http", port)
    assert f"{svc}.{NAMESPACE}.svc:{port}" in script, "the Service name must be an allowed Host"
    containers = ray_containers()
    assert len(containers) >= 4
    for where, c in containers:
        env = env_of(c)
        missing = [k for k in RAY_CONTAINER_ENV if k not in env]
        assert not missing, f"{where}: missing {missing}"
        assert env["MLFLOW_TRACKING_URI"]["value"] == f"http://{svc}.{NAMESPACE}.svc:{port}", where
        for client_key, admin_key in (("MLFLOW_TRACKING_USERNAME", "MLFLOW_AUTH_ADMIN_USERNAME"),
                                      ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_AUTH_ADMIN_PASSWORD")):
            client, server_side = env[client_key]["valueFrom"]["secretKeyRef"], admin[admin_key]["valueFrom"]["secretKeyRef"]
            assert client == server_side, f"{where}: {client_key}"
        assert all(isinstance(e["value"], str) for e in env.values() if "value" in e), f"{where}: quote env values"


# ---------------------------------------------------------------- storage
# The nodes share the bucket and the MLflow server, nothing else (issue 32): run_dir is each
# pod's own scratch, and every location a job writes on one node and reads on another is a URI.
def on_bucket(location: str) -> bool:
    """An object-store URI (s3://, gs://, ...), not a path or file:// on some node's disk."""
    return "://" in location and not location.startswith("file://")


def test_no_volume_is_shared_between_pods(mlflow_deployment):
    pvcs = {d["metadata"]["name"]: d for d in load(STORAGE_FILE) if d["kind"] == "PersistentVolumeClaim"}
    for where, c in ray_containers():
        pod = next(p for w, p in all_pods() if where.startswith(w + "/"))
        assert not mounts_by_claim(pod), f"{where}: a Ray pod mounts a PersistentVolumeClaim"
        scratch = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
        run_dir = env_of(c)["LLM2CLIP_RUN_DIR"]["value"]
        assert any(m["mountPath"] == run_dir and m["name"] in scratch for m in c["volumeMounts"]), \
            f"{where}: run_dir {run_dir} is not the pod's own emptyDir"
    users: dict[str, list[str]] = {}
    for where, pod in all_pods():
        for claim in mounts_by_claim(pod):
            users.setdefault(claim, []).append(where)
    assert users == {"llm2clip-mlflow": ["mlflow.yaml:deployment"]}, f"only MLflow's pod mounts a claim: {users}"
    assert set(users) <= set(pvcs) and pvcs["llm2clip-mlflow"]["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_storage_locations_are_named_consistently(launcher, launcher_env, mlflow_deployment):
    keys = ("LLM2CLIP_RUN_DIR", "LLM2CLIP_STORE_URI", "LLM2CLIP_STORAGE_URI", "LLM2CLIP_MODELS_URI", "LLM2CLIP_LISTING", "HF_HOME")
    values: dict[str, set[str]] = {k: {launcher_env[k]} for k in keys}
    for where, c in ray_containers():
        env = env_of(c)
        for k in keys:
            values[k].add(env[k]["value"])
    assert all(len(v) == 1 for v in values.values()), f"pods and launcher nodes disagree: {values}"
    one_value = {k: next(iter(v)) for k, v in values.items()}
    for k in ("LLM2CLIP_STORE_URI", "LLM2CLIP_STORAGE_URI", "LLM2CLIP_MODELS_URI", "LLM2CLIP_LISTING"):
        assert on_bucket(one_value[k]), f"{k} must be on the bucket, got {one_value[k]}"
    assert one_value["LLM2CLIP_MODELS_URI"].endswith("/"), "the config appends <org>/<name> to LLM2CLIP_MODELS_URI"
    run_dir = one_value["LLM2CLIP_RUN_DIR"]
    assert PurePosixPath(one_value["HF_HOME"]).is_relative_to(run_dir), "HF_HOME is node-local scratch too"
    assert config_default(yaml.safe_load(PAPER_CONFIG.read_text())["run_dir"]) == run_dir
    assert f"-v {run_dir}:{run_dir}" in launcher["docker"]["run_options"], "the launcher's containers see the host's scratch"
    # MLflow: databases on its own volume (k8s) or the head's disk (launcher), artifacts on the bucket, the same on both.
    mlflow_pod = mlflow_deployment["spec"]["template"]["spec"]
    (db_mount,) = mounts_by_claim(mlflow_pod)["llm2clip-mlflow"]
    k8s_script = " ".join(mlflow_pod["containers"][0]["args"])
    launcher_script = " ".join(launcher["head_start_ray_commands"])
    assert f"--backend-store-uri sqlite:///{db_mount}/mlflow.db" in k8s_script
    assert f"--backend-store-uri sqlite:///{run_dir}/mlflow/mlflow.db" in launcher_script
    destinations = {re.search(r"--artifacts-destination (\S+)", text).group(1) for text in (k8s_script, launcher_script)}
    assert len(destinations) == 1 and on_bucket(next(iter(destinations))), destinations


def test_with_the_pods_environment_every_shared_location_is_on_the_bucket(monkeypatch):
    """The paper config, loaded with a Ray pod's environment, names no local path a job could
    write on one node and read on another: only run_dir (and models.dir under it) are local."""
    (_, container), *_ = ray_containers()
    for name, e in env_of(container).items():
        if "value" in e:
            monkeypatch.setenv(name, e["value"])
    cfg = load_config(PAPER_CONFIG)
    shared = {"store.uri": cfg.store.uri, "storage_uri": cfg.storage_uri, "ingest.source": cfg.ingest.source,
              "models.llm": cfg.models.llm, "models.vlm": cfg.models.vlm, "models.vision": cfg.models.vision,
              "train_clip.vision_model": cfg.train_clip.vision_model}
    for s in cfg.evaluate.sets:
        shared[f"evaluate.sets.{s.name}.source"] = s.source
        shared |= {f"evaluate.sets.{s.name}.options.{k}": v for k, v in s.options.items() if isinstance(v, str) and "/" in v}
    local = {k: v for k, v in shared.items() if v is None or not on_bucket(v)}
    assert not local, f"not on the bucket: {local}"
    assert "://" not in cfg.run_dir and PurePosixPath(cfg.models.dir).is_relative_to(cfg.run_dir)


def test_pods_reach_the_bucket_through_one_service_account(mlflow_deployment):
    (account,) = [d for d in load(STORAGE_FILE) if d["kind"] == "ServiceAccount"]
    name = account["metadata"]["name"]
    pods = [(w, p) for w, p in all_pods() if any(where.startswith(w + "/") for where, _ in ray_containers())]
    pods.append(("mlflow.yaml:deployment", mlflow_deployment["spec"]["template"]["spec"]))
    for where, pod in pods:
        assert pod.get("serviceAccountName") == name, f"{where}: serviceAccountName {name} (workload identity for the bucket)"
        for c in pod["containers"]:
            refs = [e["secretRef"] for e in c.get("envFrom", []) if "secretRef" in e]
            assert all(r.get("optional") is True for r in refs), f"{where}: storage keys are optional (workload identity first)"


# ---------------------------------------------------------------- runtime envs
def test_runtime_envs_ship_the_working_copy_and_pip_matches_pyproject():
    plain = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    pip = yaml.safe_load((CLUSTER / "runtime_env.pip.yaml").read_text())
    for env in (plain, pip):
        assert env["working_dir"] == "."
        assert {".venv", ".run", ".git"} <= set(env["excludes"])
    assert plain["env_vars"] == pip["env_vars"]
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = [d for d in project["dependencies"] if not re.match(r"\s*ray\b", d)] + project["optional-dependencies"]["gpu"]
    norm = lambda specs: sorted(re.sub(r"\s+", "", s) for s in specs)  # noqa: E731
    assert norm(pip["pip"]["packages"]) == norm(wanted), "runtime_env.pip.yaml drifted from pyproject.toml"
    assert pip["config"]["setup_timeout_seconds"] >= 1800, "installing CUDA torch + vLLM takes longer than Ray's 600 s default"


# ---------------------------------------------------------------- runbook commands
def runbook_job_commands() -> list[tuple[str, list[str]]]:
    text = (REPO / "runbook.md").read_text().replace("\\\n", " ")
    found = []
    for m in re.finditer(r"python -m jobs\.(\w+)([^\n`|]*)", text):
        if m.group(1).isupper():  # a placeholder: jobs.NAME
            continue
        rest = m.group(2)
        try:
            argv = shlex.split(rest)
        except ValueError:  # the command sits inside a quoted string (ray exec '... python -m jobs.X ...')
            argv = [a.strip("'\"") for a in rest.split()]
        found.append((m.group(1), argv))
    return found


def test_runbook_commands_use_real_jobs_and_flags():
    commands = runbook_job_commands()
    assert {job for job, _ in commands} >= {"pipeline", "refresh", "ingest", "train_clip", "evaluate"}
    for job, argv in commands:
        assert job in EXPECTED_JOBS, f"runbook.md: jobs.{job} does not exist"
        flags = [a.split("=", 1)[0] for a in argv if a.startswith("--")]
        unknown = set(flags) - JOB_FLAGS[job]
        assert not unknown, f"runbook.md: jobs.{job} has no {sorted(unknown)}"
        for flag in ("--from", "--until"):
            if flag in argv:
                assert argv[argv.index(flag) + 1] in PIPELINE_STAGES, f"runbook.md: {flag} {argv[argv.index(flag) + 1]}"
        if "--config" in argv:
            config = argv[argv.index("--config") + 1]
            if config.startswith("configs/"):
                assert (REPO / config).is_file(), f"runbook.md: {config} does not exist"


def test_the_flags_the_runbook_relies_on_exist_in_the_code():
    sources = (REPO / "pipeline" / "stages" / "jobkit.py").read_text()
    quoted = lambda s, text: re.search(rf"[\"']{re.escape(s)}[\"']", text)  # noqa: E731
    for flag in (COMMON_FLAGS - {"--help"}) | {"--status"}:
        assert quoted(flag, sources), flag
    pipeline_sources = "".join(p.read_text() for p in [REPO / "jobs" / "pipeline.py", *(REPO / "pipeline" / "stages").glob("*.py")]
                               if p.is_file())
    for flag in ("--from", "--until", "--dry-run"):
        assert quoted(flag, pipeline_sources), f"jobs.pipeline has no {flag}"
    for stage in PIPELINE_STAGES:
        assert quoted(stage, pipeline_sources), f"jobs.pipeline knows no stage {stage!r}"


# ---------------------------------------------------------------- the search service (RayService)
SERVICE_FILE = KUBERAY / "rayservice.yaml"


def test_the_rayservice_builds_the_app_from_a_repo_config_with_a_pinned_model():
    import importlib

    service = one("RayService", SERVICE_FILE)
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert serve_config["http_options"]["host"] == "0.0.0.0"  # inside the pod; the Service is ClusterIP
    (application,) = serve_config["applications"]
    module, _, attr = application["import_path"].partition(":")
    assert callable(getattr(importlib.import_module(module), attr))
    args = application["args"]
    assert (REPO / args["config"]).is_file() and re.fullmatch(r"models:/[\w.-]+/\d+", args["model"]), args
    load_config(REPO / args["config"], [*args["set"], f"serve.model={args['model']}"])  # valid as the builder loads it
    token = {"name": "llm2clip-search-token", "key": "token"}
    for role, pod in pod_specs(service).items():
        for container in pod["containers"]:
            assert env_of(container)["LLM2CLIP_SERVE_TOKEN"]["valueFrom"]["secretKeyRef"] == token, role


def test_the_rollout_moves_only_its_apps_model_and_may_patch_only_that_rayservice():
    from pipeline.serve_rollout import app_model, rolled_serve_config

    service = one("RayService", SERVICE_FILE)
    current = service["spec"]["serveConfigV2"]
    app = yaml.safe_load(current)["applications"][0]["name"]
    assert rolled_serve_config(current, app, app_model(current, app)) is None  # already there: no patch
    rolled = rolled_serve_config(current, app, "models:/llm2clip-model/42")
    assert app_model(rolled, app) == "models:/llm2clip-model/42"
    before, after = yaml.safe_load(current), yaml.safe_load(rolled)
    after["applications"][0]["args"]["model"] = before["applications"][0]["args"]["model"]
    assert after == before  # nothing else changed
    with pytest.raises(ValueError, match="no application"):
        rolled_serve_config(current, "another-app", "models:/x/1")
    cron = one("CronJob", KUBERAY / "serve-rollout-cronjob.yaml")
    command = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[:3] == ["python", "-m", "pipeline.stages.serve_rollout"]
    assert command[command.index("--rayservice") + 1] == service["metadata"]["name"] == command[command.index("--app") + 1]
    (rule,) = one("Role", KUBERAY / "serve-rollout-cronjob.yaml")["rules"]
    assert rule["resources"] == ["rayservices"] and rule["resourceNames"] == [service["metadata"]["name"]]
    assert set(rule["verbs"]) == {"get", "patch"}
