"""`train-clip`: LLM2CLIP stage 2. The vision tower, the text adapter and the logit scale
learn against the frozen LLM's cached caption embeddings (or, with `text_tower: clip`, a
small CLIP text transformer learns from the same captions: the vanilla-CLIP baseline).

The driver: resolve the inputs once (`clip_samples.ClipInputs`), name the run after its
recipe and the samples it trains on, and skip it when that run has finished; else join the
samples (once per content), train `ClipTask` on the shared trainer, record the images that
could not be used in the rejects store, and finish: the saved model on storage and in MLflow,
a registry version with its lineage, and the result beside the outputs.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa

from pipeline.config import PipelineConfig
from pipeline.lineage import Lineage, ModelLineage
from pipeline.plans import StagePlan, not_ready, read_result, write_result
from pipeline.records import Tracked, hidden, label
from pipeline.stages.clip_samples import ClipInputs, SamplesMeta, load_samples
from pipeline.stages.clip_task import clip_training
from pipeline.stages.tracking import Registration, Tracker, register
from pipeline.stages.trainer import train
from pipeline.store import Store, reject_row, utc_now
from pipeline.versioning import code_version, stable_hash
from schemas import STORE_SCHEMAS

log = logging.getLogger(__name__)

NO_EMBEDDING = "no_caption_embedding"


@dataclass
class TrainClipResult(Tracked):
    run_name: str = label("run name (resume key)")
    text_tower: str = label("text tower")
    encoder_version: str | None = label("encoder_version (embedding store version)")
    caption_versions: dict[str, str] = field(default_factory=dict)  # configured name -> caption version
    train_images: int = label("training images", default=0)
    val_images: int = label("validation images", default=0)
    skipped_no_embedding: dict[str, int] = label("skipped, no caption embedding", default_factory=dict)  # split -> images
    rejected: dict[str, int] = label("rejected images", default_factory=dict)  # reason -> images
    steps: int = 0
    global_batch: int = 0
    resumed_from_step: int | None = None
    resume_verified: bool | None = label("resume verified (tensors, optimizer, lr)", default=None)
    final_loss: float | None = None
    samples_per_s: float | None = label("samples/s", default=None)  # this attempt's steady state (its first step left out)
    first_step_s: float | None = label("first step (s)", default=None)  # start-up, and compiling under train_clip.compile
    data_wait_fraction: float | None = None  # of step time, waiting for the next batch
    within_epoch_wait_fraction: float | None = label("data wait fraction within epochs", default=None)  # without each epoch's first batch
    validation: dict[str, float] = field(default_factory=dict)
    chance: dict[str, float] = label("chance R@1", default_factory=dict)  # R@1 by chance per validation set
    seconds: float = hidden(default=0.0)
    model_path: str | None = None
    model_uri: str | None = label("MLflow model URI", default=None)
    registered: str | None = label("registered model", default=None)
    reused: bool = label("finished before (nothing done)", default=False)  # this run did nothing

    def notes(self) -> dict[str, str | None]:
        ref = self.model_uri or self.model_path
        return {"use": f"from pipeline.clip_model import LLM2CLIP; LLM2CLIP.from_pretrained({ref!r})" if ref else None}


@dataclass(frozen=True)
class TrainClipPlan(StagePlan):
    inputs: ClipInputs | None = None  # None: an input is missing
    done: TrainClipResult | None = None  # the run has finished: its result


def run_name_for(cfg: PipelineConfig, inputs: ClipInputs, samples: SamplesMeta) -> str:
    """The resume key: the recipe, the models and the samples trained on, nothing else (not
    resources, not other versions or datasets in the stores)."""
    tc = cfg.train_clip
    identity = {"recipe": tc.recipe(), "vision": inputs.vision, "encoder_version": inputs.source.encoder_version,
                "clip_text": inputs.clip_text, "caption_versions": {n: inputs.captions.named[n] for n in tc.caption_weights},
                "samples": samples.digest}
    return tc.run_name or "train-clip-" + stable_hash(identity, 10)


def _planned(cfg: PipelineConfig, inputs: ClipInputs) -> TrainClipPlan:
    meta = inputs.samples.meta
    if meta is None:
        return TrainClipPlan("train-clip", "", False, "samples not joined yet: the run is named when it runs", inputs)
    name = run_name_for(cfg, inputs, meta)
    done = read_result(inputs.storage, name, TrainClipResult)
    if done:
        return TrainClipPlan("train-clip", name, True, f"finished: {done.model_path} at step {done.steps}", inputs, done)
    return TrainClipPlan("train-clip", name, False, "trains (resumes from its last checkpoint, if any)", inputs)


def plan_train_clip(cfg: PipelineConfig) -> TrainClipPlan:
    """Skipped when the run its inputs and recipe name has finished (its result is saved)."""
    try:
        return _planned(cfg, ClipInputs.resolve(cfg))
    except ValueError as e:
        return not_ready("train-clip", str(e).split(";")[0], TrainClipPlan)


def run_train_clip(cfg: PipelineConfig, tracker: Tracker, plan: TrainClipPlan | None = None) -> TrainClipResult:
    """`plan`: this config's plan, when the caller made it already (the pipeline job)."""
    tc = cfg.train_clip
    start = time.perf_counter()
    plan = plan if plan is not None and plan.inputs else _planned(cfg, ClipInputs.resolve(cfg))
    if plan.done is None and plan.inputs.samples.meta is None:  # named once joined: an earlier run may have trained these samples
        plan = _planned(cfg, plan.inputs.joined(cfg))
    if plan.done:  # a finished run does nothing: no data, training, saving or registry version
        log.info("train-clip %s finished before: %s", plan.done.run_name, plan.done.model_path)
        tracker.set_tags({"llm2clip.run_name": plan.done.run_name, "llm2clip.finished_before": "true"})
        plan.done.reused = True
        return plan.done
    inputs, name = plan.inputs, plan.output
    data = load_samples(cfg, inputs)
    meta, source, named = data.meta, inputs.source, inputs.captions.named
    result = TrainClipResult(run_name=name, text_tower=tc.text_tower, encoder_version=source.encoder_version, caption_versions=named,
                             train_images=meta.num_train, val_images=meta.num_val, global_batch=tc.global_batch_size,
                             skipped_no_embedding={s: len(v) for s, v in meta.missing.items()})
    result.tracked_by(tracker)
    manifest = tc.dataset or cfg.ingest.dataset
    tracker.set_tags({"llm2clip.run_name": name, "llm2clip.inputs.manifest": manifest, "llm2clip.inputs.embeddings": source.encoder_version or "",
                      "llm2clip.encoder_version": source.encoder_version or "", "llm2clip.inputs.captions": json.dumps(named),
                      "llm2clip.vision_model": inputs.vision})
    task, training = clip_training(cfg, inputs, data, name, tracker)
    tracker.log_params({"train_images": meta.num_train, "val_images": meta.num_val, "total_steps": training.total_steps,
                        "global_batch": tc.global_batch_size, "samples_digest": meta.digest})
    lineage = ModelLineage(stage="train-clip", run_name=name, steps=training.total_steps, config=tc.model_dump(mode="json"), code=code_version(),
                           mlflow_run_id=tracker.run_id, manifest=manifest, embeddings=source.encoder_version,
                           encoder_version=source.encoder_version, caption_versions=named, vision_model=inputs.vision,
                           samples_digest=meta.digest)
    trained = train(task, training, data.datasets, inputs.storage, "model", lineage)
    fitted = trained.fit
    result.steps, result.final_loss = fitted.state.step, fitted.state.last_loss
    result.resumed_from_step, result.resume_verified = fitted.outcome.resumed_from_step, fitted.outcome.resume_verified
    times = fitted.outcome.times
    result.first_step_s = None if times.first_step_seconds is None else round(times.first_step_seconds, 2)
    if times.seconds:
        result.samples_per_s = round(times.steps * tc.global_batch_size / times.seconds, 2)
        result.data_wait_fraction = round(times.data_wait_fraction, 4)
        result.within_epoch_wait_fraction = round(times.within_epoch_wait_fraction, 4)
    result.validation = {k: round(v, 4) for k, v in fitted.state.evaluation.items()}
    result.chance = {n: round(1 / result.validation[f"{n}.images"], 4) for n in tc.eval_captions if result.validation.get(f"{n}.images")}
    _record_rejects(cfg, result, meta, fitted.outcome.task_outcome or {}, tracker)
    result.model_path, result.model_uri = trained.model_path, trained.model_uri
    tracker.log_metrics({f"final/{k}": v for k, v in result.validation.items()} | {"steps": result.steps})
    tracker.set_tags({"llm2clip.output.model_path": result.model_path})
    if tracker.enabled and tc.register_as:
        # one version per run; the run name alone is not enough: the same inputs and recipe
        # trained under another storage path are another model
        tags = {k: json.dumps(v) if isinstance(v, dict) else str(v) for k, v in lineage.to_json().items()
                if k in ("manifest", "embeddings", "encoder_version", "caption_versions", "vision_model", "samples_digest")}
        entry = Registration(tc.register_as, "LLM2CLIP models: vision tower + text adapter (train-clip)",
                             identity={"run_name": name, "model_path": result.model_path}, tags=tags, alias=tc.register_alias)
        result.registered, result.model_uri = register(entry, "model", tracker)
    result.seconds = time.perf_counter() - start
    tracker.log_result(result, "train_clip")
    write_result(inputs.storage, name, result)
    return result


def _record_rejects(cfg: PipelineConfig, result: TrainClipResult, meta: SamplesMeta, unreadable: dict[str, tuple[str, str]],
                    tracker: Tracker) -> None:
    """Unreadable images and images without a caption embedding, into the rejects store."""
    now = utc_now()
    rows = [reject_row("train-clip", image_id, reason, detail, now) for image_id, (reason, detail) in unreadable.items()]
    rows += [reject_row("train-clip", image_id, NO_EMBEDDING, f"{split} image without a caption in {sorted(result.caption_versions.values())}"
                        + (f" embedded by {result.encoder_version}" if result.encoder_version else ""), now)
             for split, ids in meta.missing.items() for image_id in ids]
    result.rejected = dict(Counter(reason for reason, _ in unreadable.values()))
    if rows:
        Store(cfg.store.uri, "rejects").append(f"train-clip.{result.run_name}", pa.Table.from_pylist(rows, schema=STORE_SCHEMAS["rejects"]),
                                               Lineage(stage="train-clip", run_name=result.run_name, mlflow_run_id=tracker.run_id))
    tracker.log_metrics({f"rejected.{k}": v for k, v in result.rejected.items()}
                        | {f"skipped_no_embedding.{k}": v for k, v in result.skipped_no_embedding.items()})
