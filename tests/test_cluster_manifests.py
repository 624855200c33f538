"""Everything under cluster/ that a real cluster reads: the KubeRay RayCluster, RayJobs, MLflow and
storage manifests, the AWS cluster-launcher config, the runtime envs and the image recipe, plus the
job commands in runbook.md. Pure YAML/text checks, no cluster and no Ray import.

They pin what a typo would only reveal on a cluster: an entrypoint naming a job or config that does
not exist, a job without a RayJob, two image tags or a Ray version other than pyproject's pin, a
cluster or job without token auth, a dashboard or MLflow exposed beyond the cluster network, MLflow
without authentication, and storage paths that differ between the pods that share them.
(tests/test_kuberay_manifests.py covers the scheduled refresh's RayJob and CronJob in depth.)
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import tomllib
from pathlib import Path, PurePosixPath

import pytest
import yaml

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
EXPECTED_JOBS = ("ingest", "recaption", "embed", "corpus", "finetune_text", "train_clip", "evaluate", "sweep", "refresh", "pipeline")
PIPELINE_STAGES = ("ingest", "recaption", "embed", "corpus", "finetune-text", "embed-finetuned", "train-clip", "evaluate", "sweep")
COMMON_FLAGS = {"--config", "--set", "--validate-only", "--summary-json", "--help"}
JOB_FLAGS = {job: set(COMMON_FLAGS) for job in EXPECTED_JOBS}
JOB_FLAGS["refresh"] |= {"--status"}
JOB_FLAGS["pipeline"] |= {"--from", "--until", "--dry-run"}
RAY_CONTAINER_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "LLM2CLIP_STORE_URI",
                     "LLM2CLIP_LISTING", "LLM2CLIP_RUN_DIR", "HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


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
        if doc.get("kind") == "RayCluster" or (doc.get("kind") == "RayJob" and doc["spec"].get("rayClusterSpec")):
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
    assert raycluster["spec"]["rayVersion"] == pin
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^FROM\s+(\S+)", dockerfile, re.M).group(1)
    assert base.startswith("rayproject/ray:") and version_re(pin).search(base.partition(":")[2]), base
    assert f"ray.__version__ != '{pin}'" in dockerfile, "the image build checks Ray's version"
    assert any(f"ray.__version__ != '{pin}'" in c for c in launcher["setup_commands"]), "the launcher checks the node's Ray"
    assert "-t " + image in dockerfile, "the Dockerfile's build command names the manifests' image"


def test_nothing_is_exposed_beyond_the_cluster_network():
    for path, doc in k8s_docs():
        kind, spec = doc["kind"], doc.get("spec") or {}
        assert kind not in ("Ingress", "Route", "Gateway"), f"{path.name}: {kind}"
        if kind == "Service":
            assert spec.get("type", "ClusterIP") == "ClusterIP", f"{path.name}: Service type {spec.get('type')}"
        cluster = spec if kind == "RayCluster" else spec.get("rayClusterSpec") if kind == "RayJob" else None
        if cluster:
            head = cluster["headGroupSpec"]
            assert head.get("serviceType", "ClusterIP") == "ClusterIP", f"{path.name}: head serviceType"
            assert not head.get("enableIngress"), f"{path.name}: enableIngress"
    for where, pod in all_pods():
        assert not pod.get("hostNetwork"), where
        for c in pod["containers"]:
            assert not any("hostPort" in p for p in c.get("ports", [])), f"{where}: hostPort"


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
def test_each_claim_is_mounted_at_one_path_and_defined_read_write_many():
    paths: dict[str, set[str]] = {}
    for where, pod in all_pods():
        for claim, mounted in mounts_by_claim(pod).items():
            paths.setdefault(claim, set()).update(mounted)
    assert {"llm2clip-run", "llm2clip-models", "llm2clip-datasets"} <= set(paths)
    assert all(len(v) == 1 for v in paths.values()), f"a claim mounted at different paths: {paths}"
    pvcs = {d["metadata"]["name"]: d for d in load(STORAGE_FILE) if d["kind"] == "PersistentVolumeClaim"}
    assert set(paths) <= set(pvcs), f"claims without a PVC in storage.yaml: {sorted(set(paths) - set(pvcs))}"
    assert all(p["spec"]["accessModes"] == ["ReadWriteMany"] for p in pvcs.values()), "shared by pods on many nodes"


def test_storage_paths_are_named_consistently(launcher, launcher_env, mlflow_deployment):
    run_dirs, store_uris, hf_homes = set(), set(), set()
    for where, pod in all_pods():
        claims = mounts_by_claim(pod)
        for c in pod["containers"]:
            env = env_of(c)
            if "LLM2CLIP_RUN_DIR" in env:
                mounted = claims.get("llm2clip-run", [None])[:1]
                assert [env["LLM2CLIP_RUN_DIR"]["value"]] == mounted, f"{where}: run dir is not the mounted PVC"
                run_dirs.add(env["LLM2CLIP_RUN_DIR"]["value"])
                store_uris.add(env["LLM2CLIP_STORE_URI"]["value"])
                hf_homes.add(env["HF_HOME"]["value"])
                assert PurePosixPath(env["HF_HOME"]["value"]).is_relative_to(claims["llm2clip-models"][0]), where
    run_dirs.add(launcher_env["LLM2CLIP_RUN_DIR"])
    store_uris.add(launcher_env["LLM2CLIP_STORE_URI"])
    hf_homes.add(launcher_env["HF_HOME"])
    assert len(run_dirs) == 1 and len(store_uris) == 1 and len(hf_homes) == 1, (run_dirs, store_uris, hf_homes)
    (run_dir,) = run_dirs
    assert config_default(yaml.safe_load(PAPER_CONFIG.read_text())["run_dir"]) == run_dir, "the paper config's run_dir default"
    assert f"-v {run_dir}:{run_dir}" in launcher["docker"]["run_options"], "the launcher's containers see the shared run dir"
    # MLflow's stores live in the run dir's mlflow/ folder, on k8s and on the launcher's head.
    mlflow_pod = mlflow_deployment["spec"]["template"]["spec"]
    assert mounts_by_claim(mlflow_pod)["llm2clip-run"] == [run_dir]
    for text in (" ".join(mlflow_pod["containers"][0]["args"]), " ".join(launcher["head_start_ray_commands"])):
        assert f"sqlite:///{run_dir}/mlflow/mlflow.db" in text and f"--artifacts-destination {run_dir}/mlflow/artifacts" in text


def test_evaluation_sets_of_the_paper_config_are_mounted(raycluster, launcher):
    sets = yaml.safe_load(PAPER_CONFIG.read_text())["evaluate"]["sets"]
    paths = [v for s in sets for v in [s.get("source"), *(s.get("options") or {}).values()]
             if isinstance(v, str) and v.startswith("/")]
    assert paths, "the paper config names evaluation files on shared storage"
    launcher_targets = [o.split()[1].split(":")[1] for o in launcher["docker"]["run_options"] if o.startswith("-v ")]
    for role, pod in pod_specs(raycluster).items():
        for c in pod["containers"]:
            mounted = [m["mountPath"] for m in c["volumeMounts"]]
            for p in paths:
                assert any(PurePosixPath(p).is_relative_to(m) for m in mounted if m != "/dev/shm"), f"{role}: {p} not mounted"
    for p in paths:
        assert any(PurePosixPath(p).is_relative_to(t) for t in launcher_targets), f"launcher: {p} not mounted"


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
