"""`finetune-text`: caption-contrastive fine-tuning of the LLM (LLM2CLIP stage 1) with
Ray Train + DeepSpeed, ending in a merged encoder that `jobs.embed` takes as it is.

Driver: builds the training pairs from the caption store (held-out split left out) as a
Ray Dataset, measures CRA of the base model, runs a `TorchTrainer`, then merges the
adapters of the last checkpoint into a saved encoder, measures CRA again, logs the encoder
to MLflow, registers it, and prints its path, encoder_version and MLflow model URI.

Workers (`train_loop`): one DeepSpeed engine each (ZeRO stage from config; gloo on CPU,
NCCL on GPU), batches from `get_dataset_shard`, optional MNTP steps, then the contrastive
loss with negatives gathered from every worker. Every `checkpoint_every` steps all ranks
save their DeepSpeed state (adapters only: the frozen base is not written), rank 0 adds
the adapter weights and the position in the data, and Ray Train persists it. A restarted
job (same `run_name`) and a replaced worker group resume from the latest checkpoint.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import pyarrow as pa
import ray

from pipeline.caption_pairs import PROTOCOLS, caption_pairs, version_pairs
from pipeline.config import PipelineConfig
from pipeline.metrics import pairs_cra
from pipeline.stages.corpus import corpus_versions
from pipeline.stages.ingest import assign_split
from pipeline.stages.tracking import Tracker
from pipeline.store import Store
from pipeline.versioning import code_version, stable_hash

log = logging.getLogger(__name__)

LORA_STATE = "adapter_state.pt"
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
TRAIN_STATE = "train_state.json"


@dataclass
class FinetuneResult:
    base_model: str
    run_name: str
    train_pairs: int = 0
    steps: int = 0
    resumed_from_step: int | None = None
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

    def summary(self) -> dict[str, Any]:
        return {
            "stage": "finetune-text",
            "base model": self.base_model,
            "run name (resume key)": self.run_name,
            "training pairs": self.train_pairs,
            "steps": self.steps,
            "resumed from step": self.resumed_from_step,
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


def pair_versions(cfg: PipelineConfig) -> list[PairSpec]:
    """The caption versions behind every configured pair source."""
    out = []
    for source in cfg.finetune_text.pairs:
        if source.corpus:
            versions = corpus_versions(cfg, source.corpus)
            out += [PairSpec(f"{source.corpus}.short-vs-{role}", versions["short"], versions[role], repeat=source.repeat)
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
    """The training pairs (pair_id, first, second[, negative]) in a seeded shuffled order, and
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
    for name, first, second, reorder, repeat in pair_versions(cfg):
        missing = [v for v in (first, second) if not captions.commits(v)]
        if missing:
            raise ValueError(f"finetune_text.pairs: caption versions {missing} do not exist; have {captions.versions()}")
        if reorder:
            pairs = reordered_pairs(captions.read(first), ft.seed)
        else:
            pairs = version_pairs(captions.read(first), captions.read(second), first == second)
        held_out[name] = [(a, b) for item, a, b in pairs if _split_of(split, item) == ft.eval_split]
        for _ in range(repeat):
            for item, a, b in pairs:
                if _split_of(split, item) != ft.eval_split:
                    train.append((item, *((a, b) if rng.random() < 0.5 else (b, a))))  # random direction
    if not train:
        raise ValueError("finetune_text: no training pairs (check finetune_text.pairs and the caption store)")
    rng.shuffle(train)
    # pair_id: the position in this seeded order; checkpoints record which ids an epoch has trained
    columns = {"pair_id": list(range(len(train))), "first": [t[1] for t in train], "second": [t[2] for t in train]}
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
        text = dict(zip(rows.column("caption_id").to_pylist(), rows.column("text").to_pylist()))
        manifest = manifest_store.read(dataset)
        for protocol in PROTOCOLS:
            pairs = [(text[a], text[b]) for a, b in caption_pairs(manifest, rows, ft.eval_split, protocol)]
            if len(pairs) >= 2:
                sets[f"scenes.{protocol}"] = pairs
    if "long-captions" in ft.builtin_eval:
        from pipeline.long_captions import long_caption_pairs

        sets["long-captions"] = [(p.first, p.second) for p in long_caption_pairs()]
    if "everyday-pairs" in ft.builtin_eval:
        from pipeline.everyday_pairs import everyday_pairs

        sets["everyday-pairs"] = everyday_pairs()
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


@ray.remote
def _merge(base: str, cfg_json: dict, adapter_path: str, out: str, trust_remote_code: bool) -> tuple[str, str]:
    import torch

    from pipeline.config import FinetuneTextConfig
    from pipeline.finetune import save_merged

    state = torch.load(adapter_path, map_location="cpu")
    path, version = save_merged(base, FinetuneTextConfig.model_validate(cfg_json), state, out, trust_remote_code)
    return str(path), version


# ----------------------------------------------------------------- worker
def unseen_batches(frames, batch_size: int, seen: set[int]):
    """Batches of `batch_size` rows (dicts of lists) from a stream of pandas frames, leaving
    out rows whose pair_id is in `seen`: a resumed epoch trains exactly the pairs it had not,
    however Ray Data splits the stream among workers this time."""
    import pandas as pd

    pending = None
    for frame in frames:
        frame = frame[~frame["pair_id"].isin(seen)] if seen else frame
        pending = frame if pending is None else pd.concat([pending, frame], ignore_index=True)
        while len(pending) >= batch_size:
            batch, pending = pending.iloc[:batch_size], pending.iloc[batch_size:]
            yield {k: batch[k].tolist() for k in batch.columns}


def warmup_then_linear_decay(total: int, warmup: int):
    """lr factor: linear warm-up over `warmup` steps (at most a tenth of a short run), then
    linear decay to 0 at `total`."""
    warmup = max(1, min(warmup, total // 10 or 1))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train worker function: one DeepSpeed engine, resumable."""
    import deepspeed
    import torch
    import torch.distributed as dist

    from pipeline.config import FinetuneTextConfig
    from pipeline.contrastive import ContrastiveLoss
    from pipeline.finetune import TrainableEncoder, contrastive_loss, mntp_loss
    from pipeline.stages.tracking import Tracker

    # DeepSpeed's ZeRO-2 calls a collective that torch 2.13 deprecates: one warning a step
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
    ft = FinetuneTextConfig.model_validate(config["finetune_text"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(ft.seed + rank)
    device = torch.device("cuda", ctx.get_local_rank()) if ft.use_gpu else torch.device("cpu")
    model = TrainableEncoder(config["base_model"], ft, dtype=torch.float32, trust_remote_code=config["trust_remote_code"])
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=ft.lr, weight_decay=ft.weight_decay)
    total = config["total_steps"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_linear_decay(total, ft.warmup_steps))
    ds_config = {
        "train_micro_batch_size_per_gpu": ft.batch_size_per_worker,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": ft.grad_clip,
        "zero_optimization": {"stage": ft.zero_stage},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": ft.precision == "bf16"},
        "fp16": {"enabled": ft.precision == "fp16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    loss_fn = ContrastiveLoss(ft.scale, gather=world > 1)

    step, epoch, epoch_start = 0, 0, 0
    trained: set[int] = set()  # pair_ids this rank trained on in this epoch
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = json.loads((Path(d) / TRAIN_STATE).read_text())
            engine.load_checkpoint(d, tag="state", load_module_strict=False)
        step, epoch, epoch_start, trained = state["step"], state["epoch"], state["epoch_start_step"], set(state["trained_pair_ids"])
        if rank == 0:
            print(f"resumed from step {step} (epoch {epoch}, {len(trained)} of its pairs trained)", flush=True)
    resumed_from = step if checkpoint else None
    tracker = Tracker.for_run(config["tracking_uri"], config["run_id"]) if rank == 0 else Tracker(None, None)
    shard = ray.train.get_dataset_shard("train")
    generator = torch.Generator().manual_seed(ft.seed + 1000 * rank + step)
    last_loss = float("nan")

    def everyone(flag: bool) -> bool:
        """True when the flag holds on every rank: all ranks take a step or none does (their
        shards may hold different numbers of untrained pairs after a resume)."""
        t = torch.tensor([int(flag)], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    def save(reason: str) -> None:
        """All ranks write their DeepSpeed state into one folder; Ray Train persists it."""
        ids: list = [None] * world
        dist.all_gather_object(ids, sorted(trained))
        lora = {}
        if ft.zero_stage == 3:
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                lora = {n: p.detach().cpu().clone() for n, p in engine.module.named_parameters() if p.requires_grad}
        elif rank == 0:
            lora = {n: p.detach().cpu().clone().float() for n, p in engine.module.named_parameters() if p.requires_grad}
        with tempfile.TemporaryDirectory() as tmp:
            engine.save_checkpoint(tmp, tag="state", exclude_frozen_parameters=True)
            metrics = {"step": step, "loss": last_loss, "resumed_from": resumed_from if resumed_from is not None else -1}
            if rank == 0:
                torch.save({n: t.float() for n, t in lora.items()}, Path(tmp) / LORA_STATE)
                state = {"step": step, "epoch": epoch, "epoch_start_step": epoch_start, "reason": reason,
                         "trained_pair_ids": sorted(set().union(*ids))}
                (Path(tmp) / TRAIN_STATE).write_text(json.dumps(state))
            dist.barrier()
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    while step < total:
        frames = shard.iter_batches(batch_size=ft.batch_size_per_worker, batch_format="pandas",
                                    local_shuffle_buffer_size=config["shuffle_buffer"], local_shuffle_seed=ft.seed + epoch)
        batches = unseen_batches(frames, ft.batch_size_per_worker, trained)
        while everyone((batch := next(batches, None)) is not None):
            engine.train()
            if step < ft.mntp_steps:
                loss = mntp_loss(engine, batch["first"] + batch["second"], device, generator)
                scaled = loss
            else:
                loss = contrastive_loss(engine, batch, loss_fn, device)
                scaled = loss * loss_fn.backward_scale
            engine.backward(scaled)
            engine.step()
            step += 1
            trained.update(batch["pair_id"])
            last_loss = float(loss.detach())
            tracker.log_metrics({"train/loss": last_loss, "train/lr": scheduler.get_last_lr()[0],
                                 "train/phase_mntp": float(step <= ft.mntp_steps)}, step=step)
            if step % ft.checkpoint_every == 0 or step >= total:
                save("periodic" if step < total else "final")
            if step >= total:
                return
        for _ in batches:
            pass  # drain: every worker reads its whole shard before the next epoch starts the stream again
        if step == epoch_start:
            raise RuntimeError(f"rank {rank}: the data gave no full batch of {ft.batch_size_per_worker} on every worker in epoch {epoch}")
        epoch, epoch_start, trained = epoch + 1, step, set()


# ----------------------------------------------------------------- driver
def run_name_for(cfg: PipelineConfig, base: str, num_pairs: int) -> str:
    ft = cfg.finetune_text
    recipe = ft.model_dump(mode="json", exclude={"num_workers", "use_gpu", "cpus_per_worker", "max_failures", "keep_checkpoints",
                                                  "checkpoint_every", "register_as", "run_name", "builtin_eval", "baseline",
                                                  "encoder_max_length"})
    captions = Store(cfg.store.uri, "captions")
    data = [[c.commit_id for c in captions.commits(v)] for spec in pair_versions(cfg) for v in (spec.first, spec.second)]
    return "finetune-text-" + stable_hash({"base": base, "recipe": recipe, "data": data, "pairs": num_pairs}, 10)


def run_finetune_text(cfg: PipelineConfig, tracker: Tracker) -> FinetuneResult:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ft = cfg.finetune_text
    base = ft.base_model or cfg.models.llm
    start = time.perf_counter()
    pairs, held_out = training_pairs(cfg)
    sets = cra_sets(cfg, held_out)
    run_name = ft.run_name or run_name_for(cfg, base, pairs.num_rows)
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
    result.cra_before = ray.get(_evaluate_encoder.options(**res).remote("llm", base, sets, eval_opts, precision))
    if ft.baseline:
        result.cra_baseline = ray.get(_evaluate_encoder.options(num_cpus=1).remote("minilm", "", sets, {}, "fp32"))

    storage = str(Path(cfg.run_dir) / "ray_results")
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "finetune_text": ft.model_dump(mode="json"), "base_model": base, "total_steps": total,
            "trust_remote_code": cfg.models.trust_remote_code, "tracking_uri": cfg.mlflow.tracking_uri if tracker.enabled else None,
            "run_id": tracker.run_id, "shuffle_buffer": min(10_000, max(global_batch * 4, 256)),
        },
        scaling_config=ScalingConfig(num_workers=ft.num_workers, use_gpu=ft.use_gpu, resources_per_worker={"CPU": ft.cpus_per_worker}),
        datasets={"train": ray.data.from_arrow(pairs)},
        run_config=RunConfig(
            name=run_name, storage_path=storage,
            failure_config=FailureConfig(max_failures=ft.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=ft.keep_checkpoints),
        ),
    )
    fit = trainer.fit()
    if fit.checkpoint is None:
        raise RuntimeError(f"finetune-text produced no checkpoint: {fit.error}")
    result.steps = int(fit.metrics.get("step", 0))
    result.final_loss = fit.metrics.get("loss")
    resumed = fit.metrics.get("resumed_from", -1)
    result.resumed_from_step = int(resumed) if resumed is not None and resumed >= 0 else None

    with fit.checkpoint.as_directory() as d:
        adapters = Path(cfg.run_dir) / "encoders" / f".{run_name}-{result.steps}-adapters.pt"
        adapters.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(d) / LORA_STATE, adapters)
    out = Path(cfg.run_dir) / "encoders" / f"{run_name}-step{result.steps}"
    path, version = ray.get(_merge.options(**res).remote(base, ft.model_dump(mode="json"), str(adapters), str(out), cfg.models.trust_remote_code))
    adapters.unlink(missing_ok=True)
    result.encoder_path, result.encoder_version = path, version
    result.cra_after = ray.get(_evaluate_encoder.options(**res).remote("llm", path, sets, {}, precision))
    result.seconds = time.perf_counter() - start

    tracker.log_metrics({f"cra_before.{k}": v for k, v in result.cra_before.items()}
                        | {f"cra_after.{k}": v for k, v in result.cra_after.items()}
                        | {f"cra_minilm.{k}": v for k, v in result.cra_baseline.items()}
                        | {"steps": result.steps})
    tracker.set_tags({"llm2clip.output.encoder_version": version, "llm2clip.encoder_path": path})
    (Path(path) / "llm2clip_lineage.json").write_text(json.dumps(
        {"stage": "finetune-text", "base_model": base, "run_name": run_name, "mlflow_run_id": tracker.run_id,
         "config": ft.model_dump(mode="json"), "code": code_version(), "train_pairs": pairs.num_rows, "steps": result.steps}, indent=2))
    if tracker.enabled:
        tracker.log_artifact(path, "encoder")
        result.model_uri = f"runs:/{tracker.run_id}/encoder"
        if ft.register_as:
            import mlflow

            client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
            try:
                client.get_registered_model(ft.register_as)
            except mlflow.exceptions.MlflowException:
                client.create_registered_model(ft.register_as, description="LLM2CLIP stage-1 caption encoders (merged LoRA)")
            mv = client.create_model_version(ft.register_as, source=tracker.artifact_uri("encoder"), run_id=tracker.run_id,
                                             tags={"encoder_version": version, "base_model": base})
            result.registered = f"{ft.register_as} v{mv.version}"
            result.model_uri = f"models:/{ft.register_as}/{mv.version}"
    tracker.log_dict(result.summary(), "finetune/summary.json")
    result.mlflow_url = tracker.url
    return result

