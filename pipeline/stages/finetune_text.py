"""`finetune-text`: caption-contrastive fine-tuning of the LLM (LLM2CLIP stage 1) with
Ray Train + DeepSpeed, ending in a merged encoder that `jobs.embed` takes as it is.

Driver: builds the training pairs from the caption store (held-out split left out) as a
Ray Dataset, measures CRA of the base model, trains on the shared trainer
(`pipeline.stages.trainer`), then merges the adapters of the final checkpoint into a saved
encoder (a Ray task reading the checkpoint from storage), measures CRA again, registers
the encoder in MLflow, and prints its path, encoder_version and MLflow model URI.

Workers (`FinetuneTask`): a LoRA LLM in a DeepSpeed engine, pair batches from
`get_dataset_shard`, optional MNTP steps, then the contrastive loss with negatives
gathered from every worker. The run name hashes the recipe and the pairs trained on, so a
stopped job resumes, whatever else the stores gain meanwhile.
"""

from __future__ import annotations

import json
import logging
import random
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import pyarrow as pa
import ray

from pipeline.caption_pairs import version_pairs
from pipeline.config import FinetuneTextConfig, PipelineConfig
from pipeline.captioning import model_fingerprint
from pipeline.cra_sets import builtin_pairs, dataset_pairs
from pipeline.metrics import pairs_cra
from pipeline.plans import StagePlan, not_ready, read_result, write_result
from pipeline.stages.corpus import corpus_versions
from pipeline.stages.ingest import assign_split
from pipeline.stages.tracking import Tracker
from pipeline.stages.trainer import EXPORT, StepOutput, TrainPlan, TrainTask, WorkerContext, fit, full_state, storage_path
from pipeline.store import Store, StoreError
from pipeline.training import TrainState, unseen_batches
from pipeline.versioning import code_version, rows_digest, stable_hash

log = logging.getLogger(__name__)

SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass
class FinetuneResult:
    base_model: str
    run_name: str
    train_pairs: int = 0
    steps: int = 0
    resumed_from_step: int | None = None
    resume_verified: bool | None = None  # the resumed tensors, optimizer state and lr hashed as saved
    seconds: float = 0.0
    final_loss: float | None = None
    encoder_path: str | None = None
    encoder_version: str | None = None
    model_uri: str | None = None
    registered: str | None = None
    cra_before: dict[str, Any] = field(default_factory=dict)
    cra_after: dict[str, Any] = field(default_factory=dict)
    cra_baseline: dict[str, Any] = field(default_factory=dict)
    mlflow_url: str | None = None
    reused: bool = False  # finished by an earlier run: this one did nothing

    def summary(self) -> dict[str, Any]:
        return {
            "stage": "finetune-text",
            "finished before (nothing done)": self.reused,
            "base model": self.base_model,
            "run name (resume key)": self.run_name,
            "training pairs": self.train_pairs,
            "steps": self.steps,
            "resumed from step": self.resumed_from_step,
            "resume verified (tensors, optimizer, lr)": self.resume_verified,
            "final loss": self.final_loss,
            "CRA before (base model)": self.cra_before,
            "CRA after (fine-tuned)": self.cra_after,
            "CRA all-MiniLM-L6-v2": self.cra_baseline,
            "encoder path": self.encoder_path,
            "encoder_version": self.encoder_version,
            "MLflow model URI": self.model_uri,
            "registered model": self.registered,
            "next": f"python -m jobs.embed --config CONFIG --set embed.encoder={self.model_uri or self.encoder_path}",
            "mlflow run": self.mlflow_url,
        }


# ----------------------------------------------------------------- data
def _split_of(manifest_split: dict[str, str], item: str) -> str:
    """An image's manifest split; corpus items (no image) get one from a hash of their id."""
    return manifest_split.get(item) or assign_split(stable_hash(item, 16), (0.8, 0.1, 0.1))


class PairSpec(NamedTuple):
    name: str
    first: str  # caption version
    second: str
    reorder: bool = False  # second = first with its sentences in another order
    repeat: int = 1
    corpus: bool = False  # text-only items (no images, so no manifest)


def pair_versions(cfg: PipelineConfig) -> list[PairSpec]:
    """The caption versions behind every configured pair source."""
    out = []
    for source in cfg.finetune_text.pairs:
        if source.corpus:
            versions = corpus_versions(cfg, source.corpus)
            out += [PairSpec(f"{source.corpus}.short-vs-{role}", versions["short"], versions[role], repeat=source.repeat, corpus=True)
                    for role in ("dense", "paraphrase")]
        elif source.reorder_sentences:
            out.append(PairSpec(f"{source.first}-vs-reordered", source.first, source.first, reorder=True, repeat=source.repeat))
        else:
            out.append(PairSpec(f"{source.first}-vs-{source.second}", source.first, source.second, repeat=source.repeat))
    return out


def reordered_pairs(table: pa.Table, seed: int) -> list[tuple[str, str, str]]:
    """(item, caption, the caption's sentences in another order) for each item's first
    caption of at least two sentences; the order depends only on (seed, text)."""
    pairs, seen = [], set()
    for item, text in zip(table.column("image_id").to_pylist(), table.column("text").to_pylist()):
        sentences = [s for s in SENTENCE_END.split(text.strip()) if s]
        if item in seen or len(sentences) < 2:
            continue
        seen.add(item)
        order = list(range(len(sentences)))
        rng = random.Random(f"{seed}/{text}")
        while order == sorted(order):
            rng.shuffle(order)
        pairs.append((item, text, " ".join(sentences[i] for i in order)))
    return pairs


def training_pairs(cfg: PipelineConfig) -> tuple[pa.Table, dict[str, list[tuple[str, str]]]]:
    """The training pairs (pair_id, first, second, item[, negative]) in a seeded shuffled order, and
    the held-out CRA sets {name: pairs}."""
    ft = cfg.finetune_text
    captions = Store(cfg.store.uri, "captions")
    manifest_store = Store(cfg.store.uri, "manifest")
    dataset = ft.dataset or cfg.ingest.dataset
    manifest = manifest_store.read(dataset) if manifest_store.commits(dataset) else None
    split = dict(zip(manifest.column("image_id").to_pylist(), manifest.column("split").to_pylist())) if manifest is not None else {}
    rng = random.Random(ft.seed)
    train: list[tuple[str, str, str]] = []
    held_out: dict[str, list[tuple[str, str]]] = {}
    for name, first, second, reorder, repeat, corpus in pair_versions(cfg):
        missing = [v for v in (first, second) if not captions.commits(v)]
        if missing:
            raise ValueError(f"finetune_text.pairs: caption versions {missing} do not exist; have {captions.versions()}")
        if reorder:
            pairs = reordered_pairs(captions.read(first), ft.seed)
        else:
            pairs = version_pairs(captions.read(first), captions.read(second), first == second)
        if not corpus and manifest is not None:
            # a caption version holds every dataset's captions: train on this dataset's images only
            pairs = [p for p in pairs if p[0] in split]
        held_out[name] = [(a, b) for item, a, b in pairs if _split_of(split, item) == ft.eval_split]
        for _ in range(repeat):
            for item, a, b in pairs:
                if _split_of(split, item) != ft.eval_split:
                    train.append((item, *((a, b) if rng.random() < 0.5 else (b, a))))  # random direction
    if not train:
        raise ValueError("finetune_text: no training pairs (check finetune_text.pairs and the caption store)")
    rng.shuffle(train)
    # pair_id: the position in this seeded order; checkpoints record which ids an epoch has trained
    columns = {"pair_id": list(range(len(train))), "first": [t[1] for t in train], "second": [t[2] for t in train],
               "item": [t[0] for t in train]}  # the image or corpus item: what a held-out check reads
    if ft.hard_negatives:
        columns["negative"] = hard_negatives(train)
    return pa.table(columns), held_out


def hard_negatives(train: list[tuple[str, str, str]]) -> list[str]:
    """For each (item, first, second): the second caption of the next pair of another item
    (one item may stand in several pairs, with repeats even side by side)."""
    out = []
    for i, (item, _, _) in enumerate(train):
        j = next((k % len(train) for k in range(i + 1, i + len(train)) if train[k % len(train)][0] != item), None)
        if j is None:
            raise ValueError("finetune_text.hard_negatives needs pairs of at least two items")
        out.append(train[j][2])
    return out


def cra_sets(cfg: PipelineConfig, held_out: dict[str, list[tuple[str, str]]]) -> dict[str, list[tuple[str, str]]]:
    """Named CRA sets of text pairs: the held-out training pairs, the scene protocols when the
    manifest has originals and dense captions, and the built-in sets of `builtin_eval`."""
    ft = cfg.finetune_text
    sets = {f"heldout.{k}": v for k, v in held_out.items() if len(v) >= 2}
    dataset = ft.dataset or cfg.ingest.dataset
    manifest_store, captions = Store(cfg.store.uri, "manifest"), Store(cfg.store.uri, "captions")
    if manifest_store.commits(dataset):
        rows = pa.concat_tables([captions.read(v) for v in captions.versions() if v in ("original", "provided")])
        sets |= {f"scenes.{protocol}": pairs for protocol, pairs in dataset_pairs(manifest_store.read(dataset), rows, ft.eval_split).items()}
    for name in ft.builtin_eval:
        sets[name] = builtin_pairs(name)
    return sets


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


def cached_cra(cache_dir: Path, kind: str, path: str, sets: dict, options: dict, precision: str, resources: dict) -> dict[str, float]:
    """CRA of a model that training does not change (the base model, MiniLM): computed once per
    model, sets and options, then read from `cache_dir`."""
    key = stable_hash({"kind": kind, "model": model_fingerprint(path) if path else kind, "sets": sets, "options": options,
                       "precision": precision}, 16)
    file = cache_dir / f"{kind}-{key}.json"
    if file.is_file():
        return json.loads(file.read_text())
    scores = ray.get(_evaluate_encoder.options(**resources).remote(kind, path, sets, options, precision))
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f".tmp-{file.name}")
    tmp.write_text(json.dumps(scores))
    tmp.replace(file)
    return scores


# ----------------------------------------------------------------- training
@dataclass
class FinetuneTask(TrainTask):
    """Stage 1 on the shared trainer: a LoRA LLM, caption pairs, optional MNTP steps first,
    then the contrastive loss with negatives gathered from every worker."""

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
            loss = contrastive_loss(engine, batch, self.loss_fn, ctx.device)
            engine.backward(loss * self.loss_fn.backward_scale)
        engine.step()
        return StepOutput(loss=float(loss.detach()), sample_ids=batch["pair_id"], metrics={"phase_mntp": float(mntp)})

    def export(self, engine, ctx: WorkerContext) -> dict:
        return full_state(engine, trainable_only=True)  # the LoRA adapters


@ray.remote
def _merge(base: str, cfg: FinetuneTextConfig, checkpoint, dest: str, trust_remote_code: bool, tracking_uri: str | None,
           run_id: str | None, lineage_json: str) -> tuple[str, str]:
    """Merge the final checkpoint's adapters into a saved encoder, on whichever node runs this:
    the adapters are read from storage, the encoder goes to `dest` (storage) and to MLflow."""
    from safetensors.torch import load

    from pipeline.finetune import save_merged
    from pipeline.model_refs import publish_dir

    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{EXPORT}") as f:
        adapters = load(f.read())
    with tempfile.TemporaryDirectory() as tmp:
        local, version = save_merged(base, cfg, adapters, Path(tmp) / "encoder", trust_remote_code)
        (local / "llm2clip_lineage.json").write_text(lineage_json)
        Tracker.for_run(tracking_uri, run_id).log_artifact(local, "encoder")
        return publish_dir(local, dest), version


# ----------------------------------------------------------------- driver
def run_name_for(cfg: PipelineConfig, base: str, pairs: pa.Table) -> str:
    """The resume key: the recipe and the pairs trained on, nothing else (not resources, not
    other versions or datasets in the stores)."""
    ft = cfg.finetune_text
    return "finetune-text-" + stable_hash({"base": base, "recipe": ft.recipe(), "pairs": rows_digest(pairs)}, 10)


def plan_finetune_text(cfg: PipelineConfig) -> StagePlan:
    """Skipped when the run these pairs and this recipe name has finished (its result is saved)."""
    ft = cfg.finetune_text
    try:
        pairs, _ = training_pairs(cfg)
    except (ValueError, StoreError) as e:
        return not_ready("finetune-text", str(e).split(";")[0])
    run_name = ft.run_name or run_name_for(cfg, ft.base_model or cfg.models.llm, pairs)
    done = read_result(storage_path(ft.settings(), cfg.run_dir), run_name)
    if done:
        return StagePlan("finetune-text", run_name, True, f"finished: encoder {done['encoder_version']} at step {done['steps']}")
    return StagePlan("finetune-text", run_name, False, f"{pairs.num_rows} training pairs, {ft.max_steps or ft.epochs} "
                     f"{'steps' if ft.max_steps else 'epochs'} (resumes from its last checkpoint, if any)")


def finished_result(cfg: PipelineConfig) -> FinetuneResult | None:
    """The saved result of the run this config names, if it has finished."""
    ft = cfg.finetune_text
    run_name = ft.run_name or run_name_for(cfg, ft.base_model or cfg.models.llm, training_pairs(cfg)[0])
    done = read_result(storage_path(ft.settings(), cfg.run_dir), run_name)
    return FinetuneResult(**{**done, "reused": True}) if done else None


def run_finetune_text(cfg: PipelineConfig, tracker: Tracker) -> FinetuneResult:
    ft = cfg.finetune_text
    base = ft.base_model or cfg.models.llm
    start = time.perf_counter()
    pairs, held_out = training_pairs(cfg)
    run_name = ft.run_name or run_name_for(cfg, base, pairs)
    storage = storage_path(ft.settings(), cfg.run_dir)
    done = read_result(storage, run_name)
    if done:  # a finished run does nothing: no training, merge, evaluation or registry version
        log.info("finetune-text %s finished before: encoder %s", run_name, done["encoder_version"])
        tracker.set_tags({"llm2clip.run_name": run_name, "llm2clip.finished_before": "true"})
        return FinetuneResult(**{**done, "reused": True})
    sets = cra_sets(cfg, held_out)
    result = FinetuneResult(base_model=base, run_name=run_name, train_pairs=pairs.num_rows)
    global_batch = ft.batch_size_per_worker * ft.num_workers
    steps_per_epoch = pairs.num_rows // global_batch
    if steps_per_epoch == 0:
        raise ValueError(f"finetune_text: {pairs.num_rows} pairs are fewer than one global batch ({global_batch})")
    total = min(ft.max_steps or 10**12, int(ft.epochs * steps_per_epoch))
    tracker.set_tags({"llm2clip.base_model": base, "llm2clip.run_name": run_name,
                      "llm2clip.inputs.captions": json.dumps(sorted({v for spec in pair_versions(cfg) for v in (spec.first, spec.second)}))})
    tracker.log_params({"train_pairs": pairs.num_rows, "total_steps": total, "global_batch": global_batch})
    tracker.log_dict({k: len(v) for k, v in sets.items()}, "finetune/cra_sets.json")

    eval_opts = {"pooling": ft.pooling, "bidirectional": ft.bidirectional, "max_length": ft.encoder_max_length}
    res = {"num_gpus": 1 if ft.use_gpu else 0, "num_cpus": ft.cpus_per_worker}
    precision = "bf16" if ft.precision == "bf16" else "fp32"
    cache = Path(cfg.run_dir) / "cache" / "cra"
    result.cra_before = cached_cra(cache, "llm", base, sets, eval_opts, precision, res)
    if ft.baseline:
        result.cra_baseline = cached_cra(cache, "minilm", "", sets, {}, "fp32", {"num_cpus": 1})

    plan = TrainPlan(
        run_name=run_name, total_steps=total, num_samples=pairs.num_rows, micro_batch=ft.batch_size_per_worker,
        precision=ft.precision, seed=ft.seed, trainer=ft.settings(), optimizer=ft.optimizer(),
        tracking_uri=cfg.mlflow.tracking_uri if tracker.enabled else None, mlflow_run_id=tracker.run_id,
    )
    task = FinetuneTask(cfg=ft, base_model=base, trust_remote_code=cfg.models.trust_remote_code,
                        shuffle_buffer=min(10_000, max(global_batch * 4, 256)))
    fitted = fit(task, plan, {"train": ray.data.from_arrow(pairs)}, storage)
    result.steps = fitted.state.step
    result.final_loss = fitted.state.last_loss
    result.resumed_from_step = fitted.outcome.resumed_from_step
    result.resume_verified = fitted.outcome.resume_verified

    dest = f"{storage.rstrip('/')}/{run_name}/outputs/encoder-step{result.steps}"
    lineage = {"stage": "finetune-text", "base_model": base, "run_name": run_name, "mlflow_run_id": tracker.run_id,
               "config": ft.model_dump(mode="json"), "code": code_version(), "train_pairs": pairs.num_rows, "steps": result.steps}
    path, version = ray.get(_merge.options(**res).remote(base, ft, fitted.checkpoint, dest, cfg.models.trust_remote_code,
                                                         plan.tracking_uri, tracker.run_id, json.dumps(lineage, indent=2)))
    result.encoder_path, result.encoder_version = path, version
    result.cra_after = ray.get(_evaluate_encoder.options(**res).remote("llm", path, sets, {}, precision))
    result.seconds = time.perf_counter() - start

    tracker.log_metrics({f"cra_before.{k}": v for k, v in result.cra_before.items()}
                        | {f"cra_after.{k}": v for k, v in result.cra_after.items()}
                        | {f"cra_minilm.{k}": v for k, v in result.cra_baseline.items()}
                        | {"steps": result.steps})
    tracker.set_tags({"llm2clip.output.encoder_version": version, "llm2clip.encoder_path": path})
    if tracker.enabled:
        result.model_uri = f"runs:/{tracker.run_id}/encoder"
        if ft.register_as:
            import mlflow

            client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
            try:
                client.get_registered_model(ft.register_as)
            except mlflow.exceptions.MlflowException:
                client.create_registered_model(ft.register_as, description="LLM2CLIP stage-1 caption encoders (merged LoRA)")
            # The same encoder is never registered twice (a re-run killed after registering).
            same = [v for v in client.search_model_versions(f"name='{ft.register_as}'") if v.tags.get("encoder_version") == version]
            mv = same[0] if same else client.create_model_version(
                ft.register_as, source=tracker.artifact_uri("encoder"), run_id=tracker.run_id,
                tags={"encoder_version": version, "base_model": base})
            result.registered = f"{ft.register_as} v{mv.version}"
            result.model_uri = f"models:/{ft.register_as}/{mv.version}"
    tracker.log_dict(result.summary(), "finetune/summary.json")
    result.mlflow_url = tracker.url
    write_result(storage, run_name, asdict(result))
    return result
