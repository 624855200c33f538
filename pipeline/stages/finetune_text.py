"""`finetune-text`: caption-contrastive fine-tuning of the LLM (LLM2CLIP stage 1) with
Ray Train + DeepSpeed, ending in a merged encoder that `jobs.embed` takes as it is.

Driver: builds the training pairs from the caption store (`pipeline.finetune_pairs`; the
held-out split left out) as a Ray Dataset, names the run after its recipe and the pairs, and
skips it when that run has finished; else measures CRA of the base model, trains
`FinetuneTask` on the shared trainer, and finishes: the adapters of the final checkpoint merged
into a saved encoder (on any node), its CRA, a registry version, and the result beside the
outputs. It prints the encoder's path, encoder_version and MLflow model URI.

Workers (`FinetuneTask`): a LoRA LLM in a DeepSpeed engine, pair batches from
`get_dataset_shard`, optional MNTP steps, then the contrastive loss with negatives
gathered from every worker. The run name hashes the recipe and the pairs trained on, so a
stopped job resumes, whatever else the stores gain meanwhile.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray

from pipeline.captioning import model_fingerprint
from pipeline.config import FinetuneTextConfig, PipelineConfig
from pipeline.finetune_pairs import cra_sets_for, pair_versions, training_pairs
from pipeline.lineage import ModelLineage
from pipeline.metrics import pairs_cra
from pipeline.plans import StagePlan, not_ready, read_result, write_result
from pipeline.records import Tracked, hidden, label
from pipeline.stages.tracking import Registration, Tracker, register
from pipeline.stages.trainer import StepOutput, TrainPlan, TrainTask, WorkerContext, storage_path, train
from pipeline.store import StoreError
from pipeline.training import TrainState, total_steps, unseen_batches
from pipeline.uri import is_file, join, read_text, write_text
from pipeline.versioning import code_version, rows_digest, stable_hash

log = logging.getLogger(__name__)


@dataclass
class FinetuneResult(Tracked):
    base_model: str = label("base model")
    run_name: str = label("run name (resume key)")
    train_pairs: int = label("training pairs", default=0)
    steps: int = 0
    resumed_from_step: int | None = None
    resume_verified: bool | None = label("resume verified (tensors, optimizer, lr)", default=None)
    seconds: float = hidden(default=0.0)
    final_loss: float | None = None
    steps_per_s: float | None = label("steps/s", default=None)  # this attempt's steady state (its first step left out)
    first_step_s: float | None = label("first step (s)", default=None)  # start-up, and compiling under finetune_text.compile
    encoder_path: str | None = None
    encoder_version: str | None = label("encoder_version", default=None)
    model_uri: str | None = label("MLflow model URI", default=None)
    registered: str | None = label("registered model", default=None)
    cra_before: dict[str, float] = label("CRA before (base model)", default_factory=dict)
    cra_after: dict[str, float] = label("CRA after (fine-tuned)", default_factory=dict)
    cra_baseline: dict[str, float] = label("CRA all-MiniLM-L6-v2", default_factory=dict)
    reused: bool = label("finished before (nothing done)", default=False)  # this run did nothing

    def notes(self) -> dict[str, str]:
        return {"next": f"python -m jobs.embed --config CONFIG --set embed.encoder={self.model_uri or self.encoder_path}"}


@dataclass(frozen=True)
class FinetuneInputs:
    """What a finetune-text run of a config reads, resolved once."""

    base_model: str
    pairs: pa.Table  # pair_id, first, second, item[, negative]: the training pairs in their seeded order
    held_out: dict[str, list[tuple[str, str]]]  # the held-out CRA sets, by pair source
    storage: str


@dataclass(frozen=True)
class FinetunePlan(StagePlan):
    inputs: FinetuneInputs | None = None  # None: an input is missing
    done: FinetuneResult | None = None  # the run has finished: its result


# ----------------------------------------------------------------- CRA
def evaluate(encode, sets: dict[str, list[tuple[str, str]]]) -> dict[str, float]:
    return {name: round(pairs_cra(encode, pairs), 4) for name, pairs in sets.items()}


@ray.remote
def _evaluate_encoder(kind: str, path: str, sets: dict, options: dict, precision: str) -> dict[str, float]:
    """CRA of one encoder in a Ray task (a GPU task on clusters)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "minilm":
        from pipeline.baselines import MiniLMEncoder

        encoder = MiniLMEncoder()
        return evaluate(lambda t: encoder.encode(t), sets)
    from pipeline.text_encoder import TextEncoder

    encoder = TextEncoder.from_pretrained(path, dtype=precision, device=device, **options)
    return evaluate(lambda t: encoder.encode(t, batch_size=32), sets)


def cached_cra(cache: str, kind: str, path: str, sets: dict, options: dict, precision: str, resources: dict) -> dict[str, float]:
    """CRA of a model that training does not change (the base model, MiniLM): computed once per
    model, sets and options, then read from the `cache` location (a folder or storage URI)."""
    key = stable_hash({"kind": kind, "model": model_fingerprint(path) if path else kind, "sets": sets, "options": options,
                       "precision": precision}, 16)
    file = join(cache, f"{kind}-{key}.json")
    if is_file(file):
        return json.loads(read_text(file))
    scores = ray.get(_evaluate_encoder.options(**resources).remote(kind, path, sets, options, precision))
    write_text(file, json.dumps(scores))  # whole or not at all
    return scores


# ----------------------------------------------------------------- training
@dataclass
class FinetuneTask(TrainTask):
    """Stage 1 on the shared trainer: a LoRA LLM, caption pairs, optional MNTP steps first,
    then the contrastive loss with negatives gathered from every worker."""

    exports_trainable_only = True  # the final checkpoint keeps the LoRA adapters only

    cfg: FinetuneTextConfig
    base_model: str
    trust_remote_code: bool
    shuffle_buffer: int

    def build(self, ctx: WorkerContext):
        import torch

        from pipeline.contrastive import ContrastiveLoss
        from pipeline.finetune import TrainableEncoder

        self.loss_fn = ContrastiveLoss(self.cfg.scale, gather=ctx.world > 1)
        return TrainableEncoder(self.base_model, self.cfg, dtype=torch.float32, trust_remote_code=self.trust_remote_code)

    def batches(self, shard, state: TrainState, ctx: WorkerContext):
        size = self.cfg.batch_size_per_worker
        frames = shard.iter_batches(batch_size=size, batch_format="pandas", local_shuffle_buffer_size=self.shuffle_buffer,
                                    local_shuffle_seed=self.cfg.seed + state.epoch)
        return unseen_batches(frames, size, state.trained)

    def train_step(self, engine, batch, state: TrainState, ctx: WorkerContext) -> StepOutput:
        import torch

        from pipeline.finetune import contrastive_loss, mntp_loss

        engine.train()
        mntp = state.step < self.cfg.mntp_steps
        if mntp:
            generator = torch.Generator().manual_seed(self.cfg.seed + 1000 * ctx.rank + state.step)  # same masks after a resume
            loss = mntp_loss(engine, batch["first"] + batch["second"], ctx.device, generator)
            engine.backward(loss)
        else:
            loss = contrastive_loss(engine, batch, self.loss_fn, ctx.device, packed=self.cfg.packing)
            engine.backward(loss * self.loss_fn.backward_scale)
        engine.step()
        return StepOutput(loss=float(loss.detach()), sample_ids=batch["pair_id"], metrics={"phase_mntp": float(mntp)})

    def save_model(self, weights: dict[str, Any], folder: Path) -> str:
        """The base model with the trained adapters merged in, saved as an encoder; its encoder_version."""
        from pipeline.finetune import save_merged

        return save_merged(self.base_model, self.cfg, weights, folder, self.trust_remote_code)[1]


# ----------------------------------------------------------------- driver
def run_name_for(cfg: PipelineConfig, base: str, pairs: pa.Table) -> str:
    """The resume key: the recipe and the pairs trained on, nothing else (not resources, not
    other versions or datasets in the stores)."""
    ft = cfg.finetune_text
    return ft.run_name or "finetune-text-" + stable_hash({"base": base, "recipe": ft.recipe(), "pairs": rows_digest(pairs)}, 10)


def _planned(cfg: PipelineConfig) -> FinetunePlan:
    ft = cfg.finetune_text
    pairs, held_out = training_pairs(cfg)
    inputs = FinetuneInputs(ft.base_model or cfg.models.llm, pairs, held_out, storage_path(ft.settings(), cfg.storage))
    name = run_name_for(cfg, inputs.base_model, pairs)
    done = read_result(inputs.storage, name, FinetuneResult)
    if done:
        return FinetunePlan("finetune-text", name, True, f"finished: encoder {done.encoder_version} at step {done.steps}", inputs, done)
    budget = f"{ft.max_steps} steps" if ft.max_steps else f"{ft.epochs} epochs"
    return FinetunePlan("finetune-text", name, False, f"{pairs.num_rows} training pairs, {budget} (resumes from its last checkpoint, if any)",
                        inputs)


def plan_finetune_text(cfg: PipelineConfig) -> FinetunePlan:
    """Skipped when the run these pairs and this recipe name has finished (its result is saved)."""
    try:
        return _planned(cfg)
    except (ValueError, StoreError) as e:
        return not_ready("finetune-text", str(e).split(";")[0], FinetunePlan)


def run_finetune_text(cfg: PipelineConfig, tracker: Tracker, plan: FinetunePlan | None = None) -> FinetuneResult:
    """`plan`: this config's plan, when the caller made it already (the pipeline job)."""
    ft = cfg.finetune_text
    start = time.perf_counter()
    plan = plan if plan is not None and plan.inputs else _planned(cfg)
    if plan.done:  # a finished run does nothing: no training, merge, evaluation or registry version
        log.info("finetune-text %s finished before: encoder %s", plan.output, plan.done.encoder_version)
        tracker.set_tags({"llm2clip.run_name": plan.output, "llm2clip.finished_before": "true"})
        plan.done.reused = True
        return plan.done
    inputs, name, base, pairs = plan.inputs, plan.output, plan.inputs.base_model, plan.inputs.pairs
    sets = cra_sets_for(cfg, inputs.held_out)
    result = FinetuneResult(base_model=base, run_name=name, train_pairs=pairs.num_rows)
    result.tracked_by(tracker)
    global_batch = ft.batch_size_per_worker * ft.num_workers
    training = TrainPlan(
        run_name=name, total_steps=total_steps(pairs.num_rows, global_batch, ft.epochs, ft.max_steps, "finetune_text"),
        num_samples=pairs.num_rows, micro_batch=ft.batch_size_per_worker, precision=ft.precision, seed=ft.seed, trainer=ft.settings(),
        optimizer=ft.optimizer(), tracking_uri=cfg.mlflow.tracking_uri if tracker.enabled else None, mlflow_run_id=tracker.run_id)
    tracker.set_tags({"llm2clip.base_model": base, "llm2clip.run_name": name,
                      "llm2clip.inputs.captions": json.dumps(sorted({v for spec in pair_versions(cfg) for v in (spec.first, spec.second)}))})
    tracker.log_params({"train_pairs": pairs.num_rows, "total_steps": training.total_steps, "global_batch": global_batch})
    tracker.log_dict({k: len(v) for k, v in sets.items()}, "finetune/cra_sets.json")

    eval_opts = {"pooling": ft.pooling, "bidirectional": ft.bidirectional, "max_length": ft.encoder_max_length}
    res = {"num_gpus": 1 if ft.use_gpu else 0, "num_cpus": ft.cpus_per_worker}
    precision = "bf16" if ft.precision == "bf16" else "fp32"
    cache = join(cfg.run_dir, "cache", "cra")
    result.cra_before = cached_cra(cache, "llm", base, sets, eval_opts, precision, res)
    if ft.baseline:
        result.cra_baseline = cached_cra(cache, "minilm", "", sets, {}, "fp32", {"num_cpus": 1})

    task = FinetuneTask(cfg=ft, base_model=base, trust_remote_code=cfg.models.trust_remote_code,
                        shuffle_buffer=min(10_000, max(global_batch * 4, 256)))
    lineage = ModelLineage(stage="finetune-text", run_name=name, steps=training.total_steps, config=ft.model_dump(mode="json"), code=code_version(),
                           mlflow_run_id=tracker.run_id, base_model=base, train_pairs=pairs.num_rows)
    trained = train(task, training, {"train": ray.data.from_arrow(pairs)}, inputs.storage, "encoder", lineage)
    fitted = trained.fit
    result.steps, result.final_loss = fitted.state.step, fitted.state.last_loss
    result.resumed_from_step, result.resume_verified = fitted.outcome.resumed_from_step, fitted.outcome.resume_verified
    times = fitted.outcome.times
    result.first_step_s = None if times.first_step_seconds is None else round(times.first_step_seconds, 2)
    result.steps_per_s = round(times.steps / times.seconds, 3) if times.seconds else None
    result.encoder_path, result.encoder_version, result.model_uri = trained.model_path, trained.model_version, trained.model_uri
    result.cra_after = ray.get(_evaluate_encoder.options(**res).remote("llm", trained.model_path, sets, {}, precision))
    tracker.log_metrics({f"cra_before.{k}": v for k, v in result.cra_before.items()}
                        | {f"cra_after.{k}": v for k, v in result.cra_after.items()}
                        | {f"cra_minilm.{k}": v for k, v in result.cra_baseline.items()}
                        | {"steps": result.steps})
    tracker.set_tags({"llm2clip.output.encoder_version": trained.model_version, "llm2clip.encoder_path": trained.model_path})
    if tracker.enabled and ft.register_as:
        # the same encoder is never registered twice (a re-run killed after registering)
        entry = Registration(ft.register_as, "LLM2CLIP stage-1 caption encoders (merged LoRA)",
                             identity={"encoder_version": trained.model_version}, tags={"base_model": base})
        result.registered, result.model_uri = register(entry, "encoder", tracker)
    result.seconds = time.perf_counter() - start
    tracker.log_result(result, "finetune")
    write_result(inputs.storage, name, result)
    return result
