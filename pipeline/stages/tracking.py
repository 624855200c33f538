"""MLflow tracking for every job: one run per job, nestable under a parent run.

`Tracker` wraps an explicit `MlflowClient` and run id (no fluent global state), so the
same object works on the driver and, passed by run id, on rank 0 of a Ray Train job.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.time import get_current_time_millis

from pipeline.config import MlflowConfig
from pipeline.records import to_json
from pipeline.versioning import code_version

_PARAM_MAX = 6000  # MLflow's param value limit is 6000 characters
LOGGED_ARTIFACTS = "mlflow.loggedArtifacts"  # the run tag that lists its tables for the UI
# MLflow 3 opens an experiment in its GenAI view ("Traces 0, no data"). The experiment is
# tagged as a model-training one, but MLflow 3.17's UI ignores that tag (its reader is behind
# a flag hard-wired off); what works is the view named in the link, so every link we print
# carries it.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
WORKFLOW_TYPE = "machine_learning"  # the UI's "Model training" view: runs table, run pages
RUN_TABS = ("overview", "model-metrics", "system-metrics", "traces", "artifacts")


def experiment_runs_url(tracking_uri: str, experiment_id: str) -> str:
    """The experiment's runs table in the "Model training" view."""
    return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType={WORKFLOW_TYPE}"


def run_url(tracking_uri: str, experiment_id: str, run_id: str, tab: str | None = None, artifact: str | None = None) -> str:
    """A run's page in the "Model training" view; `tab` one of RUN_TABS, or `artifact` (a path in
    the run's artifacts) to open the artifact viewer on that file."""
    from urllib.parse import quote

    path = f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    if artifact:
        path += "/artifacts/" + quote(artifact.strip("/"), safe="/")
    elif tab and tab != "overview":
        if tab not in RUN_TABS:
            raise ValueError(f"unknown run tab {tab!r}; one of {RUN_TABS}")
        path += f"/{tab}"
    return f"{path}?workflowType={WORKFLOW_TYPE}"


class Tracker:
    """Logs to one MLflow run; a disabled tracker (mlflow.enabled: false) does nothing."""

    def __init__(self, client: MlflowClient | None, run_id: str | None, tracking_uri: str | None = None):
        self.client = client
        self.run_id = run_id
        self.tracking_uri = tracking_uri

    @classmethod
    def for_run(cls, tracking_uri: str | None, run_id: str | None) -> Tracker:
        """A tracker of an existing run, e.g. on rank 0 of a Ray Train job."""
        if not tracking_uri or not run_id:
            return cls(None, None)
        return cls(MlflowClient(tracking_uri=tracking_uri), run_id, tracking_uri)

    def artifact_uri(self, path: str = "") -> str | None:
        if not self.enabled:
            return None
        base = self.client.get_run(self.run_id).info.artifact_uri
        return f"{base}/{path}" if path else base

    @property
    def enabled(self) -> bool:
        return self.client is not None and self.run_id is not None

    @property
    def url(self) -> str | None:
        if not self.enabled or not (self.tracking_uri or "").startswith("http"):
            return None
        run = self.client.get_run(self.run_id)
        return run_url(self.tracking_uri, run.info.experiment_id, self.run_id)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Params of a run reopened by a re-run are kept as first logged (MLflow refuses to change
        one); a value that differs now is recorded as a tag `llm2clip.param_changed.KEY`."""
        if self.enabled and params:
            logged = self.client.get_run(self.run_id).data.params
            values = {k: str(v)[:_PARAM_MAX] for k, v in params.items()}
            self.set_tags({f"llm2clip.param_changed.{k}": f"{logged[k]} -> {v}"[:_PARAM_MAX] for k, v in values.items()
                           if k in logged and logged[k] != v})
            items = [Param(k, v) for k, v in values.items() if k not in logged]
            for i in range(0, len(items), 100):  # MLflow accepts 100 params per batch
                self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        if self.enabled and metrics:
            now = get_current_time_millis()
            items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
            self.client.log_batch(self.run_id, metrics=items)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if self.enabled and tags:
            self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        if self.enabled:
            self.client.log_dict(self.run_id, obj, artifact_file)

    def log_result(self, result: Any, section: str) -> None:
        """A stage's result, by field name, as `{section}/summary.json`."""
        if self.enabled:
            self.client.log_dict(self.run_id, to_json(result), f"{section}/summary.json")

    def log_text(self, text: str, artifact_file: str) -> None:
        if self.enabled:
            self.client.log_text(self.run_id, text, artifact_file)

    def log_table(self, data: Mapping[str, list], artifact_file: str) -> None:
        """A table (column -> values) MLflow's UI shows and compares across runs. Logging it
        again replaces it (MlflowClient.log_table appends rows, which doubles a reopened
        run's table), written in the format and with the run tag log_table uses."""
        if not self.enabled:
            return
        import pandas as pd

        self.client.log_text(self.run_id, pd.DataFrame(dict(data)).to_json(orient="split", index=False, date_format="iso"),
                             artifact_file)
        logged = json.loads(self.client.get_run(self.run_id).data.tags.get(LOGGED_ARTIFACTS, "[]"))
        entry = {"path": artifact_file, "type": "table"}
        if entry not in logged:
            self.client.set_tag(self.run_id, LOGGED_ARTIFACTS, json.dumps(logged + [entry]))

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        if self.enabled:
            self.client.log_figure(self.run_id, figure, artifact_file)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.enabled:
            path = Path(path)
            if path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), artifact_path)
            else:
                self.client.log_artifact(self.run_id, str(path), artifact_path)


RUN_KEY = "llm2clip.run_key"  # tag of a run that a re-run of the same job reopens


def open_run(client: MlflowClient, experiment_id: str, key: Mapping[str, str], tags: Mapping[str, str],
             params: Mapping[str, Any] | None = None, tracking_uri: str | None = None) -> tuple[Tracker, bool]:
    """The newest run of the experiment whose tags hold `key`, reopened (status RUNNING), or a
    new one with `key`, `tags` and `params`. Returns (tracker, reopened)."""
    where = " and ".join(f"tags.`{k}` = '{v}'" for k, v in key.items())
    found = client.search_runs([experiment_id], filter_string=where, max_results=1, order_by=["attributes.start_time DESC"])
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        tracker = Tracker(client, run_id, tracking_uri)
        # params the first attempt did not log (it was killed between creating the run and logging them)
        tracker.log_params({k: v for k, v in (params or {}).items() if k not in found[0].data.params})
        return tracker, True
    run = client.create_run(experiment_id, tags={**tags, **key})
    tracker = Tracker(client, run.info.run_id, tracking_uri)
    tracker.log_params(params or {})
    return tracker, False


@contextmanager
def start_run(
    cfg: MlflowConfig,
    stage: str,
    config: Mapping[str, Any],
    config_text: str | None = None,
    run_name: str | None = None,
    run_key: str | None = None,
) -> Iterator[Tracker]:
    """An MLflow run for one job: records the config verbatim, its flattened params,
    the code version and the stage; ends FINISHED, or FAILED if the job raises. With a
    `run_key` (a resumable job's identity), a re-run reopens the run that key started."""
    if not cfg.enabled:
        yield Tracker(None, None)
        return
    client = MlflowClient(tracking_uri=cfg.tracking_uri)
    experiment = client.get_experiment_by_name(cfg.experiment)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(cfg.experiment, tags=EXPERIMENT_KIND)
    if experiment and experiment.tags.get("mlflow.experimentKind") is None:
        client.set_experiment_tag(experiment_id, *next(iter(EXPERIMENT_KIND.items())))
    tags = {"mlflow.runName": run_name or stage, "llm2clip.stage": stage}
    tags.update({f"llm2clip.code.{k}": str(v) for k, v in code_version().items() if v})
    if cfg.parent_run_id:
        tags["mlflow.parentRunId"] = cfg.parent_run_id
    if run_key:
        tracker, reopened = open_run(client, experiment_id, {RUN_KEY: run_key}, tags, flatten(config), cfg.tracking_uri)
        if reopened:
            tracker.set_tags({k: v for k, v in tags.items() if k.startswith("llm2clip.code.")})
    else:
        run = client.create_run(experiment_id, tags=tags)
        tracker = Tracker(client, run.info.run_id, cfg.tracking_uri)
        tracker.log_params(flatten(config))
    run_id = tracker.run_id
    tracker.log_dict(dict(config), "config/resolved.json")
    if config_text is not None:
        tracker.log_text(config_text, "config/config.yaml")
    try:
        yield tracker
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")


def flatten(obj: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists become JSON strings."""
    out: dict[str, Any] = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            out[name] = json.dumps(value)
        else:
            out[name] = value
    return out


# ----------------------------------------------------------------- the model registry
@dataclass(frozen=True)
class Registration:
    name: str  # the registered model
    description: str
    identity: dict[str, str]  # tags that name this model: a version carrying all of them is this model
    tags: dict[str, str] = field(default_factory=dict)  # more of its lineage
    alias: str | None = None  # moved to the version


def register(entry: Registration, artifact: str, tracker: Tracker) -> tuple[str, str]:
    """("NAME vN", "models:/NAME/N") of the registry version holding the run's `artifact`. A
    version with the same identity tags is this model again (a re-run killed after
    registering): it is reused, never registered twice."""
    import mlflow

    client = tracker.client
    try:
        client.get_registered_model(entry.name)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(entry.name, description=entry.description)
    same = [v for v in client.search_model_versions(f"name='{entry.name}'")
            if all(v.tags.get(k) == value for k, value in entry.identity.items())]
    mv = same[0] if same else client.create_model_version(entry.name, source=tracker.artifact_uri(artifact), run_id=tracker.run_id,
                                                          tags={**entry.tags, **entry.identity})
    if entry.alias:
        client.set_registered_model_alias(entry.name, entry.alias, mv.version)
    return f"{entry.name} v{mv.version}", f"models:/{entry.name}/{mv.version}"
