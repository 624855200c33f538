"""`train-clip`: LLM2CLIP stage 2. The vision tower, the text adapter and the logit scale
learn against the frozen LLM's cached caption embeddings (or, with `text_tower: clip`, a
small CLIP text transformer learns from the same captions: the vanilla-CLIP baseline).

Data (driver, Ray Data; nothing is joined on the driver): the caption rows of the
configured versions are joined to the embedding-store version on caption_id, grouped into
one row per image, and joined to the manifest on image_id. Images of the training split
without a caption embedding are counted and skipped (the run fails below `min_coverage`).
The training samples are ordered by a seeded hash of their image id (a distributed sort)
and numbered along that order, so a checkpoint's data position (a bitmap of sample ids)
means the same samples on every run of the same content. Every epoch, Ray Data CPU tasks
read, check, decode and randomly crop each image and draw its caption; the batches stream
to the workers. Images that cannot be read any more go to the rejects store.

Training: the shared trainer (`pipeline.stages.trainer`) with `ClipTask`: one DeepSpeed
engine per worker (ZeRO-1 by default), InfoNCE or sigmoid loss over features gathered from
every worker, gradient accumulation whose contrastive batch spans all micro-batches, the
logit scale clamped after each step, held-out retrieval after every epoch. The final model
is saved (`LLM2CLIP.save_pretrained`), logged and registered in MLflow.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import ray

from pipeline.captioning import configured_caption_version
from pipeline.clip_data import PAYLOAD, normalise_pixels, order_key, prepare_batch, sample_digest
from pipeline.clip_model import LLM2CLIPConfig
from pipeline.config import PipelineConfig, TrainClipConfig
from pipeline.metrics import retrieval_recall
from pipeline.plans import StagePlan, not_ready, read_result, write_result
from pipeline.stages.tracking import Tracker
from pipeline.stages.trainer import StepOutput, TrainPlan, TrainTask, WorkerContext, fit, full_state, storage_path
from pipeline.store import Store, put_atomically, reject_row, resolve_filesystem, utc_now
from pipeline.text_encoder import ENCODER_VERSION_PREFIX
from pipeline.training import TrainState, unseen_batches
from pipeline.versioning import code_version, rows_digest, stable_hash
from schemas import STORE_SCHEMAS

log = logging.getLogger(__name__)

NO_EMBEDDING = "no_caption_embedding"
SAMPLES_META = "meta.json"
MEAN_R1 = "mean_R1"  # validation: mean of image->text and text->image recall@1 over the validation sets
RECAPTION = "recaption"  # in caption_weights / eval_captions: the version the recaption section writes


@dataclass
class TrainClipResult:
    run_name: str
    text_tower: str
    encoder_version: str | None
    caption_versions: dict[str, str] = field(default_factory=dict)  # configured name -> caption version
    train_images: int = 0
    val_images: int = 0
    skipped_no_embedding: dict[str, int] = field(default_factory=dict)  # split -> images
    rejected: dict[str, int] = field(default_factory=dict)  # reason -> images
    steps: int = 0
    global_batch: int = 0
    resumed_from_step: int | None = None
    resume_verified: bool | None = None  # the resumed tensors, optimizer state and lr hashed as saved
    final_loss: float | None = None
    samples_per_s: float | None = None  # this attempt's steady state (its first step left out)
    data_wait_fraction: float | None = None  # of step time, waiting for the next batch
    within_epoch_wait_fraction: float | None = None  # the same without each epoch's first batch
    validation: dict[str, float] = field(default_factory=dict)
    chance: dict[str, float] = field(default_factory=dict)  # R@1 by chance per validation set
    seconds: float = 0.0
    model_path: str | None = None
    model_uri: str | None = None
    registered: str | None = None
    mlflow_url: str | None = None
    reused: bool = False  # finished by an earlier run: this one did nothing

    def summary(self) -> dict[str, Any]:
        return {
            "stage": "train-clip",
            "finished before (nothing done)": self.reused,
            "run name (resume key)": self.run_name,
            "text tower": self.text_tower,
            "encoder_version (embedding store version)": self.encoder_version,
            "caption versions": self.caption_versions,
            "training images": self.train_images,
            "validation images": self.val_images,
            "skipped, no caption embedding": self.skipped_no_embedding,
            "rejected images": self.rejected,
            "steps": self.steps,
            "global batch": self.global_batch,
            "resumed from step": self.resumed_from_step,
            "resume verified (tensors, optimizer, lr)": self.resume_verified,
            "final loss": self.final_loss,
            "samples/s": self.samples_per_s,
            "data wait fraction": self.data_wait_fraction,
            "data wait fraction within epochs": self.within_epoch_wait_fraction,
            "validation": self.validation,
            "chance R@1": self.chance,
            "model path": self.model_path,
            "MLflow model URI": self.model_uri,
            "registered model": self.registered,
            "use": f"from pipeline.clip_model import LLM2CLIP; LLM2CLIP.from_pretrained({self.model_uri or self.model_path!r})",
            "mlflow run": self.mlflow_url,
        }


# ----------------------------------------------------------------- inputs
@dataclass(frozen=True)
class TextSource:
    """Where the text side's inputs come from: an embedding-store version (llm) or caption text (clip)."""

    tower: str  # llm | clip
    encoder_version: str | None = None
    encoder_ref: str | None = None  # how to load that encoder (recorded for LLM2CLIP.score)
    dim: int | None = None


@ray.remote
def _saved_encoder_version(ref: str) -> tuple[str, int]:
    """(encoder_version, dim) of an encoder, read where it can be loaded (any node)."""
    from pipeline.text_encoder import TextEncoder

    encoder = TextEncoder.from_pretrained(ref)
    return encoder.encoder_version, encoder.dim


def text_source(cfg: PipelineConfig) -> TextSource:
    tc = cfg.train_clip
    if tc.text_tower == "clip":
        return TextSource("clip")
    embeddings = Store(cfg.store.uri, "embeddings")
    ref = tc.encoder or cfg.models.llm
    if ref.startswith(ENCODER_VERSION_PREFIX):  # an embedding-store version, named by its encoder
        version = ref
        lineage = embeddings.lineage(version) if embeddings.commits(version) else []
        encoder_ref = next((c.get("encoder") for c in reversed(lineage) if c.get("encoder")), None)
    else:  # a path, hub id, storage or MLflow URI: the encoder knows its version
        version, _ = ray.get(_saved_encoder_version.remote(ref))
        encoder_ref = ref
    if not embeddings.commits(version):
        raise ValueError(f"train_clip.encoder: the embedding store has no version {version} (from {ref}); write it first with "
                         f"`python -m jobs.embed --config CONFIG --set embed.encoder={ref}`; have {embeddings.versions()}")
    dim = int(next(c.lineage["dim"] for c in embeddings.commits(version) if "dim" in c.lineage))
    return TextSource("llm", version, encoder_ref, dim)


def caption_versions(cfg: PipelineConfig, names: list[str]) -> dict[str, str]:
    """Configured caption-version names -> store versions (`recaption`: what recaption.* writes)."""
    return {n: configured_caption_version(cfg) if n == RECAPTION else n for n in names}


@dataclass
class SampleData:
    train: Any  # ray Dataset of numbered training samples
    val: Any  # ray Dataset of prepared (decoded, centre-cropped) validation samples
    num_train: int
    num_val: int
    digest: str  # the content of the training samples
    missing: dict[str, list[str]]  # split -> image ids without a caption embedding


def _collect_captions(group: pa.Table, payload: str) -> pa.Table:
    """One image's caption rows -> one row with lists (ordered by version, then caption id)."""
    order = pc.sort_indices(group, sort_keys=[("caption_version", "ascending"), ("caption_id", "ascending")])
    group = group.take(order)

    def as_list(column: str) -> pa.Array:
        values = group.column(column).combine_chunks()
        return pa.ListArray.from_arrays(pa.array([0, len(values)], type=pa.int32()), values)
    return pa.table({"image_id": group.column("image_id").slice(0, 1), "caption_id": as_list("caption_id"),
                     "caption_version": as_list("caption_version"), payload: as_list(payload)})


@ray.remote(num_returns=2)
def _number(block: pa.Table, first_id: int, trained_versions: list[str]) -> tuple[pa.Table, int]:
    """Sample ids first_id.. along the block's (sorted) order, and the digest of what the block
    trains on: each image with the ids of its captions in the trained versions."""
    ids = pa.array(np.arange(first_id, first_id + block.num_rows, dtype=np.int64))
    rows = zip(block.column("image_id").to_pylist(), block.column("caption_id").to_pylist(), block.column("caption_version").to_pylist())
    digest = sum(sample_digest(image, [c for c, v in zip(caps, versions) if v in trained_versions]) for image, caps, versions in rows)
    return block.drop_columns(["order_key"]).append_column("sample_id", ids), digest


@ray.remote
def _num_rows(block: pa.Table) -> int:
    return block.num_rows


def _numbered(ds, seed: int, trained_versions: list[str], ordered: bool = True) -> tuple[Any, int, int]:
    """Samples sorted by their seeded order key and numbered 0..n-1 along it (public Ray Data
    APIs only: a distributed sort, then one small task per block), with the content digest."""
    keyed = ds.map_batches(lambda b: b.append_column("order_key", pa.array([order_key(seed, i) for i in b.column("image_id").to_pylist()],
                                                                            type=pa.int64())), batch_format="pyarrow")
    refs = (keyed.sort("order_key") if ordered else keyed).to_arrow_refs()
    sizes = ray.get([_num_rows.remote(r) for r in refs])
    numbered, digests, first = [], [], 0
    for ref, size in zip(refs, sizes):
        block, digest = _number.remote(ref, first, trained_versions)
        numbered.append(block)
        digests.append(digest)
        first += size
    total_digest = sum(ray.get(digests)) % (1 << 64)
    return ray.data.from_arrow_refs(numbered), first, total_digest


@dataclass(frozen=True)
class CaptionPlan:
    """Which caption versions a run reads, and which make a sample usable: a training image
    needs a caption in a trained version (weight > 0), a held-out one in an evaluated version."""

    named: dict[str, str]  # configured name (caption_weights keys, eval_captions values) -> store version
    trained: tuple[str, ...]
    evaluated: tuple[str, ...]

    @property
    def versions(self) -> list[str]:
        return sorted(set(self.named.values()))

    @classmethod
    def of(cls, cfg: PipelineConfig) -> CaptionPlan:
        tc = cfg.train_clip
        named = caption_versions(cfg, list(dict.fromkeys([*tc.caption_weights, *tc.eval_captions.values()])))
        return cls(named, tuple(sorted({named[n] for n, w in tc.caption_weights.items() if w > 0})),
                   tuple(sorted({named[n] for n in tc.eval_captions.values()})))


def samples_key(cfg: PipelineConfig, source: TextSource, captions: CaptionPlan) -> str:
    """Names the joined samples by what they are made of: the commits of the manifest version,
    the caption rows of its images in each caption version read and their embeddings (by key),
    the versions that make a sample usable, the splits and the seed. Other versions, and rows
    other datasets add to the same versions (an evaluation set), do not enter it."""
    tc = cfg.train_clip
    stores = {n: Store(cfg.store.uri, n) for n in ("manifest", "captions", "embeddings")}
    dataset = tc.dataset or cfg.ingest.dataset
    if not stores["manifest"].commits(dataset):
        raise ValueError(f"train_clip.dataset: the manifest has no version {dataset!r}; have {stores['manifest'].versions()}")
    missing = [v for v in captions.versions if not stores["captions"].commits(v)]
    if missing:
        raise ValueError(f"train_clip: caption versions {missing} do not exist; have {stores['captions'].versions()}")
    images = pa.array(stores["manifest"].read(dataset, columns=["image_id"]).column("image_id"))

    def rows_of(store: Store, version: str) -> str:
        table = store.read(version, columns=["caption_id", "image_id"])
        ids = table.filter(pc.is_in(table.column("image_id"), value_set=images)).column("caption_id")
        return rows_digest(pa.table({"caption_id": pc.take(ids, pc.sort_indices(ids))}))

    rows = {"manifest": [c.commit_id for c in stores["manifest"].commits(dataset)],
            "captions": {v: rows_of(stores["captions"], v) for v in captions.versions},
            "embeddings": rows_of(stores["embeddings"], source.encoder_version)
            if source.encoder_version and stores["embeddings"].commits(source.encoder_version) else None}
    return stable_hash({"rows": rows, "payload": PAYLOAD[source.tower], "trained": captions.trained, "evaluated": captions.evaluated,
                        "splits": [tc.train_split, tc.val_split], "seed": tc.seed}, 16)


@dataclass(frozen=True)
class SampleRows:
    """The joined, numbered samples on storage: `{root}/train` and `{root}/val` (Parquet) and their meta."""

    fs: Any
    root: str
    meta: dict[str, Any]


def sample_rows(cfg: PipelineConfig, source: TextSource, captions: CaptionPlan, storage: str) -> SampleRows:
    """The training and validation samples: joined and numbered once by `join_samples` into
    `{storage}/samples/{samples_key}` (Parquet), then read from there by every run of the same
    inputs (a resumed job, a rerun, a sweep's trials); fails when too few images are usable."""
    tc = cfg.train_clip
    fs, root = resolve_filesystem(f"{storage.rstrip('/')}/samples/{samples_key(cfg, source, captions)}")
    meta = read_meta(fs, root)
    if meta is None:
        meta = join_samples(cfg, source, captions, fs, root)
    for split, total in meta["images"].items():
        missing = len(meta["missing"][split])
        if total == 0:
            raise ValueError(f"train_clip: the manifest {tc.dataset or cfg.ingest.dataset!r} has no {split!r} images")
        if 1 - missing / total < tc.min_coverage:
            wanted = captions.trained if split == tc.train_split else captions.evaluated
            raise ValueError(f"train_clip: only {total - missing} of {total} {split} images have a caption in {list(wanted)}"
                             f"{' with an embedding of ' + source.encoder_version if source.encoder_version else ''} "
                             f"(train_clip.min_coverage {tc.min_coverage}); embed the missing captions first "
                             f"(jobs.embed with embed.caption_versions={captions.versions})")
    return SampleRows(fs, root, meta)


def load_samples(cfg: PipelineConfig, source: TextSource, captions: CaptionPlan, storage: str) -> SampleData:
    """The samples (`sample_rows`) through this run's image pipeline."""
    tc = cfg.train_clip
    payload = PAYLOAD[source.tower]
    rows = sample_rows(cfg, source, captions, storage)
    fs, root, meta = rows.fs, rows.root, rows.meta
    size = tc.image_size or _image_size(cfg)
    prep = dict(size=size, payload=payload, max_bytes=cfg.ingest.limits.max_bytes)
    val = ray.data.read_parquet(f"{root}/val", filesystem=fs).map_batches(
        prepare_batch, fn_kwargs=dict(**prep, train=False), batch_format="pyarrow", batch_size=64).materialize()
    weights = {captions.named[n]: w for n, w in tc.caption_weights.items()}
    train = ray.data.read_parquet(f"{root}/train", filesystem=fs).randomize_block_order().map_batches(
        prepare_batch, fn_kwargs=dict(**prep, train=True, crop_scale=tc.crop_scale, weights=weights), batch_format="pyarrow", batch_size=64)
    return SampleData(train, val, meta["num_train"], meta["num_val"], meta["digest"], meta["missing"])


def _mark_usable(batch: pa.Table, wanted: dict[str, tuple[str, ...]]) -> pa.Table:
    """Append `usable`: the image has a caption in a version its split needs."""
    usable = [versions is not None and any(v in wanted[split] for v in versions)
              for split, versions in zip(batch.column("split").to_pylist(), batch.column("caption_version").to_pylist())]
    return batch.append_column("usable", pa.array(usable, type=pa.bool_()))


@ray.remote
def _tally(block: pa.Table) -> tuple[Counter, dict[str, list[str]]]:
    """Images per split in a block, and the ids of those that are not usable."""
    missing: dict[str, list[str]] = {}
    for image_id, split, usable in zip(*(block.column(c).to_pylist() for c in ("image_id", "split", "usable"))):
        if not usable:
            missing.setdefault(split, []).append(image_id)
    return Counter(block.column("split").to_pylist()), missing


def join_samples(cfg: PipelineConfig, source: TextSource, captions: CaptionPlan, fs, root: str) -> dict[str, Any]:
    """Join captions (and their embeddings) into one row per image and that to the manifest, in
    Ray Data; count and leave out images without a usable caption; number the samples; write
    them under `root`, meta.json last (a folder without it is an interrupted write and is redone)."""
    tc = cfg.train_clip
    payload = PAYLOAD[source.tower]
    caption_store, manifest = Store(cfg.store.uri, "captions"), Store(cfg.store.uri, "manifest")
    partitions = max(2, int(ray.cluster_resources().get("CPU", 2)))
    rows = ray.data.read_parquet([f for v in captions.versions for f in caption_store.files(v)], filesystem=caption_store.fs).select_columns(
        ["caption_id", "image_id", "caption_version"] + (["text"] if payload == "text" else []))
    if payload == "embedding":
        embeddings = Store(cfg.store.uri, "embeddings")
        vectors = ray.data.read_parquet(embeddings.files(source.encoder_version), filesystem=embeddings.fs).select_columns(
            ["caption_id", "embedding"])
        rows = rows.join(vectors, "inner", num_partitions=partitions, on=("caption_id",))
    per_image = rows.groupby("image_id", num_partitions=partitions).map_groups(
        _collect_captions, fn_kwargs={"payload": payload}, batch_format="pyarrow")
    wanted = {tc.train_split: captions.trained, tc.val_split: captions.evaluated}
    images = ray.data.read_parquet(manifest.files(tc.dataset or cfg.ingest.dataset), filesystem=manifest.fs).select_columns(
        ["image_id", "uri", "sha256", "split"]).filter(lambda r: r["split"] in wanted)
    joined = images.join(per_image, "left_outer", num_partitions=partitions, on=("image_id",)).map_batches(
        _mark_usable, fn_kwargs={"wanted": wanted}, batch_format="pyarrow").materialize()
    totals, missing = Counter(), {split: [] for split in wanted}
    for counts, block_missing in ray.get([_tally.remote(ref) for ref in joined.select_columns(["image_id", "split", "usable"]).to_arrow_refs()]):
        totals.update(counts)
        for split, ids in block_missing.items():
            missing[split] += ids

    def of_split(split: str):
        return joined.filter(lambda r, s=split: r["split"] == s and r["usable"]).drop_columns(["split", "usable"])

    if fs.get_file_info(root).type != pafs.FileType.NotFound:
        fs.delete_dir(root)  # an interrupted write
    train, num_train, digest = _numbered(of_split(tc.train_split), tc.seed, captions.trained)
    val, num_val, _ = _numbered(of_split(tc.val_split), tc.seed, captions.trained, ordered=False)  # never trained: any ids do
    train.write_parquet(f"{root}/train", filesystem=fs)
    val.write_parquet(f"{root}/val", filesystem=fs)
    meta = {"num_train": num_train, "num_val": num_val, "digest": f"{digest:016x}", "missing": missing,
            "images": {s: totals.get(s, 0) for s in wanted}, "versions": captions.versions,
            "encoder_version": source.encoder_version, "created_at": utc_now().isoformat()}
    put_atomically(fs, f"{root}/{SAMPLES_META}", json.dumps(meta))
    return meta


def read_meta(fs, root: str) -> dict[str, Any] | None:
    try:
        with fs.open_input_stream(f"{root}/{SAMPLES_META}") as f:
            return json.loads(f.read().decode())
    except (FileNotFoundError, OSError):
        return None


def _image_size(cfg: PipelineConfig) -> int:
    from pipeline.image_transforms import ImageSpec
    from pipeline.model_refs import local_path

    return ImageSpec.from_processor(local_path(cfg.train_clip.vision_model or cfg.models.vision)).size


# ----------------------------------------------------------------- training
@dataclass
class ClipTask(TrainTask):
    """Stage 2 on the shared trainer."""

    model_config: LLM2CLIPConfig
    vision_path: str
    clip_text_path: str | None
    tc: TrainClipConfig
    eval_versions: dict[str, str]  # validation set name -> caption version
    shuffle_buffer: int

    def _setup(self, ctx: WorkerContext) -> None:
        """The worker-side state every variant of the task has: its loss, the unreadable images seen."""
        from pipeline.contrastive import ClipLoss, SigLipLoss

        self.loss_fn = ClipLoss(local_loss=True, gather_with_grad=True) if self.tc.loss == "clip" else SigLipLoss(gather_with_grad=True)
        self.rejects: dict[str, tuple[str, str]] = {}

    def build(self, ctx: WorkerContext):
        from pipeline.clip_model import LLM2CLIP

        model = LLM2CLIP.build(self.model_config, self.vision_path, self.clip_text_path)
        if self.tc.vision_unlocked_groups is not None:
            model.vision.lock(self.tc.vision_unlocked_groups)
        if self.tc.gradient_checkpointing:
            model.vision.set_grad_checkpointing(True)
        self._setup(ctx)
        self.spec = model.image_spec
        self.flops_per_sample = _forward_flops(model, self.spec.size, self.model_config) * 3 if ctx.plan.trainer.use_gpu else 0.0
        return model.to(ctx.device)

    def param_groups(self, model, optimizer) -> list[dict[str, Any]]:
        return model.param_groups(optimizer.lr, self.tc.text_lr or optimizer.lr, optimizer.weight_decay, self.tc.layer_decay)

    def batches(self, shard, state: TrainState, ctx: WorkerContext):
        size = ctx.plan.micro_batch * ctx.plan.accum_steps
        frames = shard.iter_batches(batch_size=size, batch_format="numpy", prefetch_batches=2,
                                    local_shuffle_buffer_size=self.shuffle_buffer, local_shuffle_seed=self.tc.seed + state.epoch)
        return unseen_batches(self._readable(frames), size, state.trained, id_column="sample_id")

    def _readable(self, frames):
        """Drop (and remember) samples whose image could not be read."""
        readable, unreadable = 0, Counter()
        for frame in frames:
            bad = frame["reason"] != ""
            for i in np.flatnonzero(bad):
                self.rejects[str(frame["image_id"][i])] = (str(frame["reason"][i]), str(frame["detail"][i]))
                unreadable[str(frame["reason"][i])] += 1
            readable += int((~bad).sum())
            yield {k: v[~bad] for k, v in frame.items() if k not in ("reason", "detail")}
        if unreadable and not readable:
            raise RuntimeError(f"none of the {sum(unreadable.values())} images this worker read could be read: {dict(unreadable)} "
                               "(were the image files moved or deleted after ingest?)")

    def _text(self, model, batch: dict[str, Any], device):
        import torch

        if "embedding" in batch:
            return torch.from_numpy(np.asarray(batch["embedding"], dtype=np.float32)).to(device)
        return {k: v.to(device) for k, v in model.text.tokenize(list(batch["text"])).items()}

    def _image_input(self, batch: dict[str, Any], ctx: WorkerContext):
        """What the model's vision side takes: normalised pixels."""
        import torch

        return normalise_pixels(torch.from_numpy(np.ascontiguousarray(batch["pixels"])).to(ctx.device), self.spec.mean, self.spec.std)

    def _val_batches(self):
        """The held-out samples whose image could be read, every caption of each."""
        for batch in ray.train.get_dataset_shard("val").iter_batches(batch_size=64, batch_format="numpy"):
            batch = {k: v[batch["reason"] == ""] for k, v in batch.items()}
            if len(batch["sample_id"]):
                yield batch

    def train_step(self, engine, batch, state: TrainState, ctx: WorkerContext) -> StepOutput:
        import torch

        from pipeline.contrastive import contrastive_step

        engine.train()
        model = engine.module
        pixels = self._image_input(batch, ctx)
        text = self._text(model, batch, ctx.device)
        k, m = ctx.plan.accum_steps, ctx.plan.micro_batch
        micro = [(pixels[i * m:(i + 1) * m], text[i * m:(i + 1) * m] if isinstance(text, torch.Tensor)
                  else {n: t[i * m:(i + 1) * m] for n, t in text.items()}) for i in range(k)]

        def backward(surrogate):
            engine.backward(surrogate, scale_wrt_gas=False)  # contrastive_step's parts already add up to the whole gradient
            engine.step()

        loss = contrastive_step(lambda mb: engine(*mb), micro, self.loss_fn, backward)
        if ctx.world > 1:  # each rank holds its rows' share of the loss: the mean over ranks is the global batch's
            import torch.distributed as dist

            dist.all_reduce(loss)
            loss = loss / ctx.world
        metrics = {"logit_scale": float(model.logit_scale.detach().float().exp().item())}
        return StepOutput(loss=float(loss), sample_ids=batch["sample_id"], metrics=metrics, flops=self.flops_per_sample * len(pixels))

    def after_step(self, engine, ctx: WorkerContext) -> None:
        """Clamp the logit scale to [0, ln 100], in the module and in DeepSpeed's fp32 master copy."""
        import torch
        from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

        from pipeline.clip_model import MAX_LOGIT_SCALE

        param = engine.module.logit_scale
        master = safe_get_full_fp32_param(param)  # a collective under ZeRO: every rank calls it
        if master is not None:
            safe_set_full_fp32_param(param, master.clamp(0.0, MAX_LOGIT_SCALE))
        with torch.no_grad():
            param.clamp_(0.0, MAX_LOGIT_SCALE)

    def evaluate(self, engine, state: TrainState, ctx: WorkerContext) -> dict[str, float]:
        """Image<->text recall@1/5/10 on the held-out split, one set per `eval_captions` entry."""
        if ctx.plan.trainer.zero_stage < 3 and ctx.rank != 0:
            return {}  # rank 0 has every weight; under ZeRO-3 all ranks take part in each forward
        model = engine.module
        model.eval()
        payload = PAYLOAD[self.model_config.text_tower]
        images, texts = [], {name: ([], []) for name in self.eval_versions}
        for batch in self._val_batches():
            first = sum(len(x) for x in images)
            images.append(model.encode_image(self._image_input(batch, ctx)).numpy())
            for name, version in self.eval_versions.items():
                owners, items = texts[name]
                for row, (versions, values) in enumerate(zip(batch["caption_version"], batch[payload])):
                    for v, value in zip(versions, values):
                        if v == version:
                            owners.append(first + row)
                            items.append(value)
        model.train()
        if not images:
            return {}
        image_emb = np.concatenate(images)
        out = {}
        for name, (owners, items) in texts.items():
            if not items:
                continue
            text_input = np.stack([np.asarray(x, dtype=np.float32) for x in items]) if payload == "embedding" else list(items)
            text_emb = model.encode_text(text_input).numpy()
            keep = sorted(set(owners))  # images with a caption of this version
            index = {img: i for i, img in enumerate(keep)}
            recall = retrieval_recall(image_emb[keep], text_emb, [index[o] for o in owners])
            # MLflow metric names take no '@': i2t_r@1 -> i2t_R1
            out |= {f"{name}.{k.replace('r@', 'R')}": v for k, v in recall.items()} | {f"{name}.images": float(len(keep))}
        r1 = [v for k, v in out.items() if k.endswith("_R1")]
        if r1:  # one number to compare runs and rank sweep trials by
            out[MEAN_R1] = float(np.mean(r1))
        return out

    def export(self, engine, ctx: WorkerContext) -> dict:
        return full_state(engine, trainable_only=False)

    def outcome(self, ctx: WorkerContext) -> dict[str, tuple[str, str]]:
        """Unreadable images seen by any rank (image_id -> (reason, detail))."""
        import torch.distributed as dist

        parts: list = [None] * ctx.world
        dist.all_gather_object(parts, self.rejects)
        return {k: v for part in parts for k, v in part.items()}


def _forward_flops(model, size: int, config: LLM2CLIPConfig) -> float:
    """FLOPs of one sample's forward pass, counted by torch (for model FLOP/s on GPUs)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    pixels = torch.zeros(1, 3, size, size)
    text = torch.zeros(1, config.text_dim) if config.text_tower == "llm" else model.text.tokenize(["a photo"])
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(pixels, text)
    return float(counter.get_total_flops())


@ray.remote
def _save_model(config: LLM2CLIPConfig, vision_path: str, clip_text_path: str | None, checkpoint, dest: str,
                tracking_uri: str | None, run_id: str | None, lineage_json: str) -> str:
    """Build the final model from the checkpoint's exported weights (read from storage) and
    save it to `dest` and to MLflow, on whichever node runs this."""
    import tempfile

    from safetensors.torch import load

    from pipeline.clip_model import LLM2CLIP
    from pipeline.model_refs import publish_dir
    from pipeline.stages.trainer import EXPORT

    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{EXPORT}") as f:
        weights = load(f.read())
    model = LLM2CLIP.build(config, vision_path, clip_text_path)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or any(k in dict(model.named_parameters()) for k in missing):
        raise RuntimeError(f"exported weights do not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "model"
        model.save_pretrained(local)
        (local / "llm2clip_lineage.json").write_text(lineage_json)
        Tracker.for_run(tracking_uri, run_id).log_artifact(local, "model")
        return publish_dir(local, dest)


# ----------------------------------------------------------------- driver
def shuffle_buffer_rows(global_batch: int, workers: int) -> int:
    """Rows each worker mixes locally. The stored order is already a seeded hash order and
    the block order changes every epoch; a larger buffer only delays each epoch's first
    batch, which waits for the buffer to fill."""
    return min(10_000, max(2 * global_batch // workers, 64))


def run_name_for(cfg: PipelineConfig, source: TextSource, captions: CaptionPlan, digest: str) -> str:
    """The resume key: the recipe, the models and the samples trained on, nothing else (not
    resources, not other versions or datasets in the stores)."""
    tc = cfg.train_clip
    identity = {"recipe": tc.recipe(), "vision": tc.vision_model or cfg.models.vision, "encoder_version": source.encoder_version,
                "clip_text": cfg.models.clip_text if tc.text_tower == "clip" else None,
                "caption_versions": {n: captions.named[n] for n in tc.caption_weights}, "samples": digest}
    return tc.run_name or "train-clip-" + stable_hash(identity, 10)


def model_config_for(tc: TrainClipConfig, source: TextSource, vision: str) -> LLM2CLIPConfig:
    """The model a train-clip config builds (the text dim and encoder come from the embeddings)."""
    return LLM2CLIPConfig(
        embed_dim=tc.embed_dim, text_tower=tc.text_tower, text_dim=source.dim, adapter_blocks=tc.adapter_blocks,
        adapter_expansion=tc.adapter_expansion, adapter_dropout=tc.adapter_dropout, init_logit_scale=math.log(1 / tc.init_temperature),
        init_logit_bias=-10.0 if tc.loss == "siglip" else None, image_size=tc.image_size,
        encoder_version=source.encoder_version, text_encoder=source.encoder_ref, vision_source=vision)


def total_steps(tc: TrainClipConfig, num_train: int, num_workers: int) -> int:
    """Optimizer steps of a run: `epochs` of whole global batches, at most `max_steps`."""
    per_step = num_workers * tc.accum_steps
    if tc.global_batch_size % per_step:
        raise ValueError(f"train_clip.global_batch_size {tc.global_batch_size} must divide into num_workers x accum_steps = "
                         f"{per_step} micro-batches")
    steps_per_epoch = num_train // tc.global_batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"train_clip: {num_train} training images are fewer than one global batch ({tc.global_batch_size})")
    return min(tc.max_steps or 10**12, math.ceil(tc.epochs * steps_per_epoch))


def train_plan(tc: TrainClipConfig, run_name: str, total: int, num_train: int, tracking_uri: str | None, run_id: str | None,
               checkpoint_epochs: bool = False) -> TrainPlan:
    return TrainPlan(run_name=run_name, total_steps=total, num_samples=num_train,
                     micro_batch=tc.global_batch_size // (tc.num_workers * tc.accum_steps), precision=tc.precision, seed=tc.seed,
                     trainer=tc.settings(), optimizer=tc.optimizer(), accum_steps=tc.accum_steps, tracking_uri=tracking_uri,
                     mlflow_run_id=run_id, checkpoint_epochs=checkpoint_epochs)


@dataclass
class ClipRun:
    """A train-clip run prepared on the driver: its inputs, its model and its data."""

    source: TextSource
    captions: CaptionPlan
    vision: str
    clip_text: str | None
    storage: str
    data: SampleData
    run_name: str
    model_config: LLM2CLIPConfig
    total_steps: int

    def task(self, tc: TrainClipConfig) -> ClipTask:
        return ClipTask(model_config=self.model_config, vision_path=self.vision, clip_text_path=self.clip_text, tc=tc,
                        eval_versions={name: self.captions.named[v] for name, v in tc.eval_captions.items()},
                        shuffle_buffer=shuffle_buffer_rows(tc.global_batch_size, tc.num_workers))

    @property
    def datasets(self) -> dict[str, Any]:
        return {"train": self.data.train, "val": self.data.val}


def vision_ref(cfg: PipelineConfig) -> str:
    vision = cfg.train_clip.vision_model or cfg.models.vision
    if not vision:
        raise ValueError("train_clip.vision_model (or models.vision) must name a vision backbone")
    return vision


def prepare_run(cfg: PipelineConfig) -> ClipRun:
    """Resolve the inputs, join (or reuse) the samples, name the run."""
    tc = cfg.train_clip
    source = text_source(cfg)
    captions = CaptionPlan.of(cfg)
    vision = vision_ref(cfg)
    clip_text = cfg.models.clip_text if tc.text_tower == "clip" else None
    if tc.text_tower == "clip" and not clip_text:
        raise ValueError("train_clip.text_tower: clip needs models.clip_text (a CLIPTextModel folder; `make models` builds tiny-clip-text)")
    storage = storage_path(tc.settings(), cfg.run_dir)
    data = load_samples(cfg, source, captions, storage)
    total = total_steps(tc, data.num_train, tc.num_workers)
    return ClipRun(source, captions, vision, clip_text, storage, data, run_name_for(cfg, source, captions, data.digest),
                   model_config_for(tc, source, vision), total)


def planned_run_name(cfg: PipelineConfig) -> str | None:
    """The run's name from the inputs alone, once its samples are joined (else None)."""
    source, captions = text_source(cfg), CaptionPlan.of(cfg)
    storage = storage_path(cfg.train_clip.settings(), cfg.run_dir)
    fs, root = resolve_filesystem(f"{storage.rstrip('/')}/samples/{samples_key(cfg, source, captions)}")
    meta = read_meta(fs, root)
    return run_name_for(cfg, source, captions, meta["digest"]) if meta else None


def plan_train_clip(cfg: PipelineConfig) -> StagePlan:
    """Skipped when the run its inputs and recipe name has finished (its result is saved)."""
    try:
        name = planned_run_name(cfg)
    except ValueError as e:
        return not_ready("train-clip", str(e).split(";")[0])
    if name is None:
        return StagePlan("train-clip", "", False, "samples not joined yet: the run is named when it runs")
    done = read_result(storage_path(cfg.train_clip.settings(), cfg.run_dir), name)
    if done:
        return StagePlan("train-clip", name, True, f"finished: {done['model_path']} at step {done['steps']}")
    return StagePlan("train-clip", name, False, "trains (resumes from its last checkpoint, if any)")


def finished_result(cfg: PipelineConfig) -> TrainClipResult | None:
    """The saved result of the run this config names, if it has finished."""
    name = planned_run_name(cfg)
    done = read_result(storage_path(cfg.train_clip.settings(), cfg.run_dir), name) if name else None
    return TrainClipResult(**{**done, "reused": True}) if done else None


def run_train_clip(cfg: PipelineConfig, tracker: Tracker) -> TrainClipResult:
    tc = cfg.train_clip
    start = time.perf_counter()
    done = finished_result(cfg)
    if done:  # a finished run does nothing: no data, training, saving or registry version
        log.info("train-clip %s finished before: %s", done.run_name, done.model_path)
        tracker.set_tags({"llm2clip.run_name": done.run_name, "llm2clip.finished_before": "true"})
        return done
    run = prepare_run(cfg)
    done = read_result(run.storage, run.run_name)
    if done:  # the samples were joined again (their inputs gained commits) but are the ones it trained on
        return TrainClipResult(**{**done, "reused": True})
    source, data, named, storage = run.source, run.data, run.captions.named, run.storage
    vision, clip_text, model_config, global_batch = run.vision, run.clip_text, run.model_config, tc.global_batch_size
    result = TrainClipResult(run_name=run.run_name, text_tower=tc.text_tower, encoder_version=source.encoder_version, caption_versions=named,
                             train_images=data.num_train, val_images=data.num_val, global_batch=global_batch,
                             skipped_no_embedding={s: len(v) for s, v in data.missing.items()})
    tracker.set_tags({"llm2clip.run_name": result.run_name, "llm2clip.inputs.manifest": tc.dataset or cfg.ingest.dataset,
                      "llm2clip.inputs.embeddings": source.encoder_version or "", "llm2clip.encoder_version": source.encoder_version or "",
                      "llm2clip.inputs.captions": json.dumps(named), "llm2clip.vision_model": vision})
    tracker.log_params({"train_images": data.num_train, "val_images": data.num_val, "total_steps": run.total_steps,
                        "global_batch": global_batch, "samples_digest": data.digest})

    plan = train_plan(tc, run.run_name, run.total_steps, data.num_train, cfg.mlflow.tracking_uri if tracker.enabled else None,
                      tracker.run_id)
    fitted = fit(run.task(tc), plan, run.datasets, storage)
    result.steps, result.final_loss = fitted.state.step, fitted.state.last_loss
    result.resumed_from_step = fitted.outcome.resumed_from_step
    result.resume_verified = fitted.outcome.resume_verified
    if fitted.outcome.step_seconds:
        result.samples_per_s = round(fitted.outcome.timed_steps * global_batch / fitted.outcome.step_seconds, 2)
        result.data_wait_fraction = round(fitted.outcome.data_wait_fraction, 4)
        result.within_epoch_wait_fraction = round(fitted.outcome.within_epoch_wait_fraction, 4)
    result.validation = {k: round(v, 4) for k, v in fitted.state.evaluation.items()}
    result.chance = {name: round(1 / result.validation[f"{name}.images"], 4) for name in tc.eval_captions
                     if result.validation.get(f"{name}.images")}
    _record_rejects(cfg, result, data, fitted.outcome.task_outcome or {}, tracker)

    lineage = {"stage": "train-clip", "run_name": result.run_name, "mlflow_run_id": tracker.run_id, "manifest": tc.dataset or cfg.ingest.dataset,
               "embeddings": source.encoder_version, "encoder_version": source.encoder_version, "caption_versions": named,
               "vision_model": vision, "samples_digest": data.digest, "config": tc.model_dump(mode="json"), "code": code_version(),
               "steps": result.steps}
    dest = f"{storage.rstrip('/')}/{result.run_name}/outputs/model-step{result.steps}"
    result.model_path = ray.get(_save_model.options(num_cpus=tc.cpus_per_worker, num_gpus=1 if tc.use_gpu else 0).remote(
        model_config, vision, clip_text, fitted.checkpoint, dest, plan.tracking_uri, tracker.run_id, json.dumps(lineage, indent=2)))
    result.seconds = time.perf_counter() - start
    tracker.log_metrics({f"final/{k}": v for k, v in result.validation.items()} | {"steps": result.steps})
    tracker.set_tags({"llm2clip.output.model_path": result.model_path})
    if tracker.enabled:
        result.model_uri = f"runs:/{tracker.run_id}/model"
        if tc.register_as:
            result.registered, result.model_uri = _register(cfg, tracker, lineage, result.model_path)
    tracker.log_dict(result.summary(), "train_clip/summary.json")
    result.mlflow_url = tracker.url
    write_result(storage, result.run_name, asdict(result))
    return result


def _record_rejects(cfg: PipelineConfig, result: TrainClipResult, data: SampleData, unreadable: dict[str, tuple[str, str]],
                    tracker: Tracker) -> None:
    """Unreadable images and images without a caption embedding, into the rejects store."""
    now = utc_now()
    rows = [reject_row("train-clip", image_id, reason, detail, now) for image_id, (reason, detail) in unreadable.items()]
    rows += [reject_row("train-clip", image_id, NO_EMBEDDING, f"{split} image without a caption in {sorted(result.caption_versions.values())}"
                        + (f" embedded by {result.encoder_version}" if result.encoder_version else ""), now)
             for split, ids in data.missing.items() for image_id in ids]
    result.rejected = dict(Counter(reason for reason, _ in unreadable.values()))
    if rows:
        Store(cfg.store.uri, "rejects").append(f"train-clip.{result.run_name}", pa.Table.from_pylist(rows, schema=STORE_SCHEMAS["rejects"]),
                                               {"stage": "train-clip", "run_name": result.run_name, "mlflow_run_id": tracker.run_id})
    tracker.log_metrics({f"rejected.{k}": v for k, v in result.rejected.items()}
                        | {f"skipped_no_embedding.{k}": v for k, v in result.skipped_no_embedding.items()})


def _register(cfg: PipelineConfig, tracker: Tracker, lineage: dict[str, Any], model_path: str) -> tuple[str, str]:
    """A new version of the registered model, tagged with its lineage; the alias moves to it."""
    import mlflow

    tc = cfg.train_clip
    client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
    try:
        client.get_registered_model(tc.register_as)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(tc.register_as, description="LLM2CLIP models: vision tower + text adapter (train-clip)")
    tags = {k: json.dumps(v) if isinstance(v, dict) else str(v) for k, v in lineage.items()
            if k in ("manifest", "embeddings", "encoder_version", "caption_versions", "vision_model", "run_name", "samples_digest")}
    tags["model_path"] = model_path
    # One version per run: a re-run killed after registering reuses it. The run name alone is not
    # enough: the same inputs and recipe trained under another storage path are another model.
    same = [v for v in client.search_model_versions(f"name='{tc.register_as}'")
            if v.tags.get("run_name") == tags["run_name"] and v.tags.get("model_path") == model_path]
    mv = same[0] if same else client.create_model_version(tc.register_as, source=tracker.artifact_uri("model"), run_id=tracker.run_id,
                                                          tags=tags)
    if tc.register_alias:
        client.set_registered_model_alias(tc.register_as, tc.register_alias, mv.version)
    return f"{tc.register_as} v{mv.version}", f"models:/{tc.register_as}/{mv.version}"
