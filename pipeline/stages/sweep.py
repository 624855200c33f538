"""`sweep`: Ray Tune over train-clip's recipe (adapter shape, learning rates, temperature,
dropout, caption mix), every trial a run of the shared trainer.

The Tune trainable is a function that builds the trial's config (the sweep's base config
with the trial's dotted keys, validated), and fits a `TorchTrainer` through the shared
trainer with Tune's `TuneReportCallback`: every epoch's validation reaches Tune, so ASHA
stops trailing trials at its rungs. The trial's Train run is named after the sweep and the
trial id (no timestamps), so a trial that is started again resumes its Train run.

Modes:
- cheap (default): the frozen vision tower's pooled features of every sample image are
  computed once into the feature store (`pipeline.stages.features`); a trial trains the text
  adapter, the vision projection and the logit scale (`LLM2CLIP.on_features`) on them and on
  the cached LLM embeddings. No image is decoded in a trial: seconds per trial.
- full: each trial is a small train-clip run (images, the whole tower).

MLflow: the job's run is the sweep's parent run (reopened when the sweep resumes); each
trial has a nested run (`mlflow.parentRunId`) with its params and its curves, logged by
its rank 0. At the end: the trials table, a parallel-coordinates plot and the best trial's
config as a ready-to-use YAML for `jobs.train_clip`.

Resume: the Tune experiment lives at `{storage}/sweeps/{name}`; a re-run with the same
config restores it (`Tuner.restore`): finished trials are not run again, unfinished ones
start again and resume their Train runs from their last epoch checkpoint.
"""

from __future__ import annotations

import importlib.util
import math
import os
import shlex
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import ray

from pipeline.clip_data import TextStandardisation
from pipeline.config import PipelineConfig, SearchDomain, validate_config
from pipeline.image_transforms import ImageSpec
from pipeline.records import Tracked, hidden, label
from pipeline.stages.clip_samples import CaptionPlan, ClipInputs, TextSource, load_samples, read_meta, text_standardisation, write_meta
from pipeline.stages.clip_task import MEAN_R1, ClipTask, FeatureClipTask, train_plan
from pipeline.stages.features import FeatureResult, compute_features, feature_identity
from pipeline.stages.tracking import Tracker, open_run
from pipeline.stages.trainer import finished_run, fit
from pipeline.store import Store
from pipeline.uri import join, write_bytes
from pipeline.uri import name as uri_name
from pipeline.sweep_report import TrialRow, best_config_yaml, parallel_coordinates, trials_table
from pipeline.training import TrainState
from pipeline.versioning import stable_hash

BEST_CONFIG = "best_train_clip.yaml"  # written last: its presence means the sweep is done

TRIAL_KEY = "llm2clip.trial_id"
SWEEP_KEY = "llm2clip.sweep"


# ----------------------------------------------------------------- what a trial gets
@dataclass(frozen=True)
class TrialInputs:
    """Everything a trial needs besides its sampled values and the datasets (typed; pickled once)."""

    base: dict[str, Any]  # the sweep's resolved config (JSON); a trial applies its dotted keys to it
    sweep_name: str
    mode: str
    storage: str  # the trials' Train runs live under it
    max_epochs: float
    workers: int
    cpus_per_worker: float
    source: TextSource
    vision: str  # the run's vision backbone (a cheap trial trains only its projection, on cached features)
    num_train: int
    feature_dim: int | None = None
    image_spec: ImageSpec | None = None  # what the cached features were computed with (cheap)
    text_standardisation: TextStandardisation | None = None  # of the training split's embeddings (cheap)
    tracking_uri: str | None = None
    experiment_id: str | None = None
    parent_run_id: str | None = None


def trial_config(inputs: TrialInputs, values: dict[str, Any]) -> PipelineConfig:
    """The trial's config: the base with the trial's values, its budget and resources, no registry."""
    from pipeline.config import apply_overrides

    data = apply_overrides({k: v for k, v in inputs.base.items() if k != "sweep"}, list(values.items()))
    data["train_clip"].update(epochs=inputs.max_epochs, max_steps=None, num_workers=inputs.workers, register_as=None,
                              cpus_per_worker=inputs.cpus_per_worker, checkpoint_every=10**9, keep_checkpoints=1, max_failures=1)
    return validate_config(data, source=f"sweep trial {values}")


def _trial_tracker(inputs: TrialInputs, trial_id: str, values: dict[str, Any]) -> Tracker:
    """The trial's nested MLflow run, reopened when the trial starts again."""
    if not inputs.tracking_uri or not inputs.parent_run_id:
        return Tracker(None, None)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(inputs.tracking_uri)
    tags = {"mlflow.parentRunId": inputs.parent_run_id, "mlflow.runName": f"trial-{trial_id}", "llm2clip.stage": "sweep-trial"}
    tracker, reopened = open_run(client, inputs.experiment_id, {SWEEP_KEY: inputs.sweep_name, TRIAL_KEY: trial_id}, tags,
                                 values | {"trial_id": trial_id}, inputs.tracking_uri)
    attempts = int(client.get_run(tracker.run_id).data.tags.get("llm2clip.trial_attempts", "0")) + 1
    tracker.set_tags({"llm2clip.trial_attempts": attempts})
    return tracker


def run_trial(values: dict[str, Any], inputs: TrialInputs, datasets: dict[str, Any] | None = None) -> None:
    """Tune's function trainable: one trial, reported back epoch by epoch."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(inputs, values)
    tc = cfg.train_clip
    tracker = _trial_tracker(inputs, trial_id, values)
    run_name = f"{inputs.sweep_name}-{trial_id}"
    tracking_uri = inputs.tracking_uri if tracker.enabled else None
    if inputs.mode == "cheap":
        captions = CaptionPlan.of(cfg)  # a trial may weigh the caption versions differently
        task = FeatureClipTask(tc=tc, source=inputs.source, vision_path=inputs.vision, clip_text_path=None,
                               eval_versions={name: captions.named[v] for name, v in tc.eval_captions.items()}, shuffle_buffer=0,
                               image_spec=inputs.image_spec, feature_dim=inputs.feature_dim,
                               weights={captions.named[n]: w for n, w in tc.caption_weights.items()},
                               text_standardisation=inputs.text_standardisation if tc.standardise_text else None)
        data = datasets
    else:
        clip_inputs = ClipInputs.resolve(cfg, inputs.source)
        samples = load_samples(cfg, clip_inputs)
        task, data = ClipTask.of(cfg, clip_inputs, samples.text_standardisation), samples.datasets
    plan = train_plan(tc, run_name, inputs.num_train, tracking_uri, tracker.run_id, checkpoint_epochs=True)
    done = finished_run(plan, inputs.storage)
    if done is not None:  # trained before the sweep's driver stopped: report its result, train nothing
        tune.report(report_metrics(done.state))
    else:
        fit(task, plan, data, inputs.storage, callbacks=[TuneReportCallback()])
    if tracker.enabled:
        tracker.client.set_terminated(tracker.run_id, status="FINISHED")


def report_metrics(state: TrainState) -> dict[str, float]:
    """What the trainer reports at a checkpoint (the same keys)."""
    return {"step": state.step, "epoch": state.epoch, "loss": state.last_loss if state.last_loss is not None else float("nan"),
            **state.evaluation}


# ----------------------------------------------------------------- the search
def tune_domain(domain: SearchDomain):
    from ray import tune

    kind, value = domain.kind, getattr(domain, domain.kind)
    return {"choice": lambda: tune.choice(value), "grid": lambda: tune.grid_search(value),
            "uniform": lambda: tune.uniform(*value), "loguniform": lambda: tune.loguniform(*value),
            "randint": lambda: tune.randint(value[0], value[1] + 1)}[kind]()


def search_algorithm(cfg: PipelineConfig, concurrency: int):
    """Optuna (TPE) when chosen or, with `auto`, installed; else Tune's random variant generator
    (which caps concurrent trials itself: Tune ignores `max_concurrent_trials` for it)."""
    from ray.tune.search.basic_variant import BasicVariantGenerator

    sw = cfg.sweep
    have_optuna = importlib.util.find_spec("optuna") is not None
    if sw.search == "optuna" and not have_optuna:
        raise ValueError("sweep.search: optuna is not installed (pip install optuna), or use search: random")
    if sw.search == "optuna" or (sw.search == "auto" and have_optuna):
        grid = [k for k, d in sw.space.items() if d.kind == "grid"]
        if grid:
            raise ValueError(f"sweep.space: {grid} are grids, which Optuna does not take; use choice, or sweep.search: random")
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=sw.seed), "optuna"
    return BasicVariantGenerator(random_state=sw.seed, max_concurrent=concurrency), "random"


def trial_resources(cfg: PipelineConfig) -> tuple[int, float, int]:
    """(workers per trial, CPUs per worker, trials at once) from the sweep section and the cluster."""
    sw, tc = cfg.sweep, cfg.train_clip
    workers = sw.workers_per_trial or (1 if sw.mode == "cheap" else tc.num_workers)
    cpus = sw.cpus_per_trial_worker if sw.mode == "cheap" else tc.cpus_per_worker
    resources = ray.cluster_resources()
    if tc.use_gpu:
        fits = int(resources.get("GPU", 0) // workers)
    else:  # full trials decode images besides their workers: leave them a CPU each
        fits = int(resources.get("CPU", 1) // (workers * cpus + (0 if sw.mode == "cheap" else 1)))
    trials = sw.trials * math.prod(len(d.grid) for d in sw.space.values() if d.kind == "grid")
    return workers, cpus, max(1, min(sw.concurrency or fits, trials))


def frozen_tower(cfg: PipelineConfig, inputs: ClipInputs) -> str:
    """The tower a cheap sweep caches features of."""
    return cfg.sweep.vision_model or inputs.vision


def sweep_name(cfg: PipelineConfig, inputs: ClipInputs | None = None) -> str:
    """The resume key: the sweep section, the base recipe, the inputs the trials read, and where
    the sweep lives (two run folders on one MLflow server are two sweeps)."""
    if cfg.sweep.name:
        return cfg.sweep.name
    inputs = inputs or ClipInputs.resolve(cfg)
    tower = frozen_tower(cfg, inputs)
    features = feature_identity(tower, cfg.train_clip.image_size)[0] if cfg.sweep.mode == "cheap" else None  # a moved alias is another sweep
    identity = {"storage": inputs.storage, "features": features,
                "sweep": cfg.sweep.model_dump(mode="json", exclude={"name", "concurrency", "feature_actors", "feature_batch_size"}),
                "recipe": cfg.train_clip.recipe(), "vision": tower, "encoder_version": inputs.source.encoder_version,
                "samples": inputs.samples.key}
    return "sweep-" + stable_hash(identity, 10)


@dataclass
class SweepResult(Tracked):
    name: str = label("sweep (resume key)")
    mode: str
    search: str = ""
    scheduler: str = ""
    trials: int = 0
    finished: int = 0
    stopped_early: int = 0
    errored: int = 0
    resumed: bool = False
    concurrency: int = label("trials at once", default=0)
    features: FeatureResult | None = None
    best_trial: str | None = None
    best_metric: float | None = None
    metric: str = MEAN_R1
    best_params: dict[str, Any] = label("best values", default_factory=dict)
    best_config_path: str | None = label("best config", default=None)
    rows: list[TrialRow] = hidden(default_factory=list)
    seconds: float = 0.0

    def notes(self) -> dict[str, str | None]:
        sets = " ".join(f"--set {shlex.quote(f'{k}={v}')}" for k, v in self.best_params.items())
        return {"train it": f"python -m jobs.train_clip --config {self.best_config_path}" if self.best_config_path else None,
                "or": f"python -m jobs.train_clip --config CONFIG {sets}" if sets else None}


@dataclass(frozen=True)
class FeatureSamples:
    """The meta of a sweep's samples joined to their cached features (kept beside the samples)."""

    feature_version: str
    samples: str  # the samples' folder


def _cheap_inputs(cfg: PipelineConfig, inputs: ClipInputs, tracker: Tracker) -> tuple[dict[str, Any], int, FeatureResult]:
    """Cached features joined to the samples' caption embeddings: materialised train/val datasets."""
    tc, sw = cfg.train_clip, cfg.sweep
    rows = inputs.joined(cfg).samples
    read = {split: ray.data.read_parquet(f"{rows.root}/{split}", filesystem=rows.fs) for split in ("train", "val")}
    features = compute_features(cfg.store.uri, frozen_tower(cfg, inputs), read["train"].union(read["val"]), tc.image_size,
                                cfg.ingest.limits.max_bytes, sw.feature_actors, sw.feature_batch_size, tracker.run_id)
    # The samples with their features, joined once and kept beside the samples: a resumed or
    # repeated sweep of the same inputs and tower reads them back.
    root = f"{rows.root}-{features.version}"
    if read_meta(rows.fs, root, FeatureSamples) is None:
        if rows.fs.get_file_info(root).type != pafs.FileType.NotFound:
            rows.fs.delete_dir(root)  # an interrupted write
        store = Store(cfg.store.uri, "features")
        cached = ray.data.read_parquet(store.files(features.version), filesystem=store.fs).select_columns(["image_id", "feature"])
        partitions = max(2, int(ray.cluster_resources().get("CPU", 2)))
        columns = ["sample_id", "image_id", "caption_version", "embedding"]
        # one join for both splits (each hash shuffle costs seconds), then split again
        tagged = [ds.select_columns(columns).map_batches(_with_split, fn_kwargs={"split": split}, batch_format="pyarrow")
                  for split, ds in read.items()]
        joined = tagged[0].union(tagged[1]).join(cached, "inner", num_partitions=partitions, on=("image_id",)).materialize()
        for split in read:
            joined.filter(expr=f"split == '{split}'").drop_columns(["split"]).write_parquet(f"{root}/{split}", filesystem=rows.fs)
        write_meta(rows.fs, root, FeatureSamples(features.version, rows.root))
    data = {split: ray.data.read_parquet(f"{root}/{split}", filesystem=rows.fs).materialize() for split in read}
    num_train = data["train"].count()
    if num_train < rows.meta.num_train:
        print(f"sweep: {rows.meta.num_train - num_train} training images have no feature (unreadable: {features.rejected})", flush=True)
    return data, num_train, features


def _trial_dirname(trial) -> str:
    return trial.trial_id


def _with_split(batch, split: str):
    import pyarrow as pa

    return batch.append_column("split", pa.array([split] * batch.num_rows, type=pa.string()))


def run_sweep(cfg: PipelineConfig, tracker: Tracker) -> SweepResult:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    sw, tc = cfg.sweep, cfg.train_clip
    if not sw.space:
        raise ValueError("sweep.space is empty: give dotted train_clip keys with ranges, e.g. "
                         "train_clip.text_lr: {loguniform: [1.0e-4, 1.0e-2]} (configs/local.yaml has an example)")
    if sw.mode == "cheap" and tc.text_tower != "llm":
        raise ValueError("sweep.mode cheap trains the adapter on cached LLM embeddings: train_clip.text_tower must be llm")
    start = time.perf_counter()
    inputs = ClipInputs.resolve(cfg)
    name = sweep_name(cfg, inputs)
    result = SweepResult(name=name, mode=sw.mode, metric=sw.metric)
    result.tracked_by(tracker)
    workers, cpus, concurrency = trial_resources(cfg)
    search, result.search = search_algorithm(cfg, concurrency)
    result.concurrency = concurrency
    datasets, feature = None, None
    if sw.mode == "cheap":
        datasets, num_train, feature = _cheap_inputs(cfg, inputs, tracker)
        result.features = feature
    else:
        num_train = inputs.joined(cfg).samples.meta.num_train
    experiment_id = tracker.client.get_run(tracker.run_id).info.experiment_id if tracker.enabled else None
    storage = inputs.storage
    standardises = tc.standardise_text or "train_clip.standardise_text" in sw.space  # else no trial needs the pass
    trial = TrialInputs(base=cfg.model_dump(mode="json"), sweep_name=name, mode=sw.mode, storage=f"{storage.rstrip('/')}/sweep-trials",
                        max_epochs=sw.max_epochs, workers=workers, cpus_per_worker=cpus, source=inputs.source, vision=inputs.vision,
                        num_train=num_train, feature_dim=feature.dim if feature else None, image_spec=feature.spec if feature else None,
                        text_standardisation=text_standardisation(datasets["train"]) if datasets and standardises else None,
                        tracking_uri=cfg.mlflow.tracking_uri if tracker.enabled else None, experiment_id=experiment_id,
                        parent_run_id=tracker.run_id)
    tracker.set_tags({SWEEP_KEY: name, "llm2clip.sweep.mode": sw.mode, "llm2clip.sweep.search": result.search,
                      "llm2clip.sweep.features": feature.version if feature else ""})
    # The trial's own actor only waits on its Train run, whose workers hold the trial's CPUs.
    # Tune refuses an empty bundle, and any CPU fraction here would leave the last trial's
    # workers short of a whole CPU: it reserves a little memory instead.
    trainable = tune.with_parameters(tune.with_resources(run_trial, {"memory": 64 * 2**20}), inputs=trial, datasets=datasets)
    path = f"{storage.rstrip('/')}/sweeps/{name}"
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")  # the experiment state follows each trial closely (resume)
    max_t = math.ceil(sw.max_epochs)
    scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=max_t, grace_period=min(sw.grace_epochs, max_t),
                               reduction_factor=sw.reduction_factor) if sw.scheduler == "asha" else FIFOScheduler())
    result.scheduler = sw.scheduler
    if tune.Tuner.can_restore(path):
        result.resumed = True
        print(f"sweep {name}: resuming the Tune experiment at {path}", flush=True)
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={k: tune_domain(d) for k, d in sw.space.items()},
            tune_config=tune.TuneConfig(metric=sw.metric, mode="max", num_samples=sw.trials, scheduler=scheduler, search_alg=search,
                                        max_concurrent_trials=concurrency if result.search == "optuna" else None,
                                        trial_dirname_creator=_trial_dirname),
            run_config=tune.RunConfig(name=name, storage_path=f"{storage.rstrip('/')}/sweeps", verbose=1,
                                      failure_config=tune.FailureConfig(max_failures=1),
                                      callbacks=[_closer(trial.tracking_uri, tracker.run_id, name, sw.metric, max_t)]),
        )
    grid = tuner.fit()
    result.rows = [_row(r, sw.metric, max_t, tracker, name) for r in grid]
    result.trials = len(result.rows)
    for status in ("finished", "stopped_early", "errored"):
        setattr(result, status, sum(r.status == status for r in result.rows))
    _report(cfg, result, tracker)
    result.seconds = round(time.perf_counter() - start, 1)
    return result


def trial_status(epochs: int, max_t: int, errored: bool) -> str:
    return "errored" if errored else ("finished" if epochs >= max_t else "stopped_early")


def _trial_run_id(tracker: Tracker, name: str, trial_id: str) -> str | None:
    experiment_id = tracker.client.get_run(tracker.run_id).info.experiment_id
    found = tracker.client.search_runs([experiment_id], filter_string=f"tags.`{SWEEP_KEY}` = '{name}' and tags.`{TRIAL_KEY}` = '{trial_id}'",
                                       max_results=1)
    return found[0].info.run_id if found else None


def close_trial_run(tracker: Tracker, name: str, trial_id: str, status: str, metrics: dict[str, float]) -> str | None:
    """End a trial's nested run as Tune ended the trial (a trial stopped by the scheduler, even
    at its last epoch, is killed before its own code can)."""
    run_id = _trial_run_id(tracker, name, trial_id) if tracker.enabled else None
    if run_id:
        child = Tracker(tracker.client, run_id, tracker.tracking_uri)
        child.set_tags({"llm2clip.trial_status": status})
        child.log_metrics(metrics)
        tracker.client.set_terminated(run_id, status="FAILED" if status == "errored" else "FINISHED")
    return run_id


def _closer(tracking_uri: str | None, parent_run_id: str | None, name: str, metric: str, max_t: int):
    """A Tune callback (on the driver) that ends each trial's nested run as the trial ends. It
    holds plain values only: Tune pickles it with the experiment and restores it on resume."""
    from ray.tune import Callback

    class CloseTrialRuns(Callback):
        def _close(self, trial, errored: bool) -> None:
            result = trial.last_result or {}
            epochs = int(result.get("training_iteration", 0))
            final = {f"final/{metric}": result[metric], "final/epochs": epochs} if metric in result else {}
            close_trial_run(Tracker.for_run(tracking_uri, parent_run_id), name, trial.trial_id, trial_status(epochs, max_t, errored), final)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._close(trial, errored=False)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._close(trial, errored=True)

    return CloseTrialRuns()


def _row(result, metric: str, max_t: int, tracker: Tracker, name: str) -> TrialRow:
    """A Tune result as a TrialRow."""
    metrics = result.metrics or {}
    # Tune names a trial's folder by its id (`_trial_dirname`), but a resumed sweep gives a trial
    # whose folder the killed run had already made a new one (`<id>_<suffix>`): the id its results
    # carry is the one its MLflow run and Train run are named by.
    trial_id = metrics.get("trial_id") or (uri_name(result.path) if result.path else "?")
    epochs = int(metrics.get("training_iteration", 0))
    value = metrics.get(metric)
    return TrialRow(trial_id=trial_id, params=dict(result.config or {}), metric=None if value is None else float(value), epochs=epochs,
                    status=trial_status(epochs, max_t, result.error is not None),
                    mlflow_run_id=_trial_run_id(tracker, name, trial_id) if tracker.enabled else None)


def _report(cfg: PipelineConfig, result: SweepResult, tracker: Tracker) -> None:
    """Best trial, trials table, parallel-coordinates plot and the best config, on the parent run and on disk."""
    sw = cfg.sweep
    ranked = [r for r in result.rows if r.metric is not None]
    tracker.log_metrics({"trials": result.trials, "finished": result.finished, "stopped_early": result.stopped_early,
                         "errored": result.errored})
    if not ranked:
        return
    # Among trials that ran the whole budget when there are any: a trial stopped at a rung was
    # compared with fewer epochs, so its metric is not comparable with a finished one's.
    pool = [r for r in ranked if r.status == "finished"] or ranked
    best = max(pool, key=lambda r: r.metric)
    result.best_trial, result.best_metric, result.best_params = best.trial_id, round(best.metric, 4), best.params
    out = join(sweeps_dir(cfg), result.name)
    figure = parallel_coordinates(result.rows, sw.metric, title=f"{result.name}: {len(ranked)} trials "
                                  f"({result.stopped_early} stopped early, dashed); colour: {sw.metric}")
    with tempfile.TemporaryDirectory(prefix="sweep-report-") as local:
        best_yaml = Path(local) / BEST_CONFIG
        best_yaml.write_text(best_config_yaml(cfg.model_dump(mode="json"), best, sw.metric, result.name))
        figure.savefig(Path(local) / "parallel_coordinates.png", dpi=110)
        tracker.log_artifact(best_yaml, "sweep")
        write_bytes(join(out, "parallel_coordinates.png"), (Path(local) / "parallel_coordinates.png").read_bytes())
        write_bytes(join(out, BEST_CONFIG), best_yaml.read_bytes())  # last: its presence means the sweep is done
    result.best_config_path = join(out, BEST_CONFIG)
    tracker.log_figure(figure, "sweep/parallel_coordinates.png")
    tracker.log_table(trials_table(result.rows, sw.metric), "sweep/trials.json")
    tracker.log_metrics({f"best/{sw.metric}": best.metric})
    tracker.set_tags({"llm2clip.sweep.best_trial": best.trial_id})


def sweeps_dir(cfg: PipelineConfig) -> str:
    """Where sweeps write their best config and plot: on storage."""
    return join(cfg.storage, "sweeps")
