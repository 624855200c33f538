"""`embed`: caption-store versions -> an embedding-store version (one per encoder_version).

Ray Data streams the captions through a pool of actors, each holding one `TextEncoder`;
inside an actor every batch is sorted by length and encoded in micro-batches, so padding
stays small; bf16 is used where the hardware has it. Captions already embedded by this
encoder (same caption_id, hence same text) are skipped; empty captions, and over-long ones
when `embed.overlong: reject`, go to the rejects store. Counts reconcile:
input = written + skipped + rejected. Afterwards the job reports CRA on held-out pairs.

Embeddings are stored as float16 (`embed.store_dtype`; a version keeps the type it was first
written in, so older float32 versions keep growing as float32) and read back as float32. A
commit is a few Parquet files of ~`ROWS_PER_FILE` rows each, so readers work in parallel.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from pipeline.caption_pairs import PROTOCOLS, caption_pairs
from pipeline.config import EmbedConfig, PipelineConfig, pool_bounds
from pipeline.faults import crash_point
from pipeline.hardware import resolve_precision
from pipeline.metrics import caption_retrieval_accuracy
from pipeline.lineage import Lineage, StoreInput
from pipeline.plans import StagePlan, not_ready
from pipeline.records import Tracked, hidden, label
from pipeline.stages.runtime import actor_pool
from pipeline.stages.tracking import Tracker
from pipeline.store import Store, Transaction, embedding_matrix, reject_row, utc_now
from pipeline.text_encoder import ENCODER_VERSION_PREFIX, TextEncoder
from pipeline.timing import Laps
from pipeline.versioning import code_version, text_sha256
from schemas import STORE_SCHEMAS

#: embed.store_dtype -> the element type of the stored embedding lists
STORE_DTYPES = {"float16": pa.float16(), "float32": pa.float32()}
#: rows per Parquet file of a commit (up to twice as many; the last file of a commit fewer): 100k
#: captions are two files, not one per Ray Data block; 10M are 200 that readers take in parallel
ROWS_PER_FILE = 50_000


@dataclass(frozen=True)
class HeldOutCra:
    """CRA of an encoder on one protocol's held-out caption pairs."""

    cra: float
    pairs: int
    split: str
    protocol: str


@dataclass
class EmbedResult(Tracked):
    encoder: str
    encoder_version: str = label("encoder_version (embedding store version)")
    dim: int
    precision: str
    input_rows: int = label("input captions", default=0)
    written: int = 0
    skipped: int = label("skipped (already embedded)", default=0)
    rejected: int = 0
    truncated: int = 0
    reject_reasons: dict[str, int] = field(default_factory=dict)
    seconds: float = hidden(default=0.0)
    cra: dict[str, HeldOutCra] = label("CRA", default_factory=dict)  # protocol -> CRA on held-out pairs
    commit: str | None = None
    store_dtype: str = label("stored as", default="")  # the version's element type: float16 or float32
    phases: dict[str, float] = hidden(default_factory=dict)  # driver wall seconds per phase (pipeline.timing)
    encode_seconds: float = hidden(default=0.0)  # the actors' time inside `encode`, summed over actors

    def notes(self) -> dict[str, float | None]:
        return {"captions/s": round(self.written / self.seconds, 1) if self.seconds else None}


def encoder_kwargs(cfg: EmbedConfig) -> dict[str, Any]:
    return {
        k: v
        for k, v in dict(pooling=cfg.pooling, bidirectional=cfg.bidirectional, max_length=cfg.max_length, instruction=cfg.instruction).items()
        if v is not None
    }


class EmbedCaptions:
    """Ray Data actor: one encoder per actor; pyarrow batches in, embedding rows out."""

    def __init__(self, path: str, options: dict[str, Any], precision: str, use_gpu: bool, overlong: str, micro_batch_size: int,
                 trust_remote_code: bool, store_dtype: str):
        device = "cuda" if use_gpu else "cpu"
        self.encoder = TextEncoder.from_pretrained(path, dtype=precision, device=device, trust_remote_code=trust_remote_code, **options)
        self.version = self.encoder.encoder_version
        self.overlong = overlong
        self.micro_batch_size = micro_batch_size
        self.store_dtype = store_dtype

    def __call__(self, batch: pa.Table) -> pa.Table:
        crash_point("embed.batch")
        texts = batch.column("text").to_pylist()
        max_len = self.encoder.options.max_length
        lengths = self.encoder.token_lengths([t or "" for t in texts])
        reasons, details = [], []
        for text, n in zip(texts, lengths):
            if not text or not text.strip():
                reasons.append("empty_caption"), details.append("caption is empty or whitespace")
            elif n > max_len and self.overlong == "reject":
                reasons.append("too_long"), details.append(f"{n} tokens > max_length {max_len}")
            else:
                reasons.append(""), details.append("truncated" if n > max_len else "")
        keep = [i for i, r in enumerate(reasons) if not r]
        dim = self.encoder.dim
        emb = np.zeros((len(texts), dim), dtype=np.float32)
        began = time.perf_counter()
        if keep:
            emb[keep] = self.encoder.encode([texts[i] for i in keep], batch_size=self.micro_batch_size)
        encode_seconds = time.perf_counter() - began
        ids = batch.column("caption_id").to_pylist()
        return pa.table(
            {
                "caption_id": batch.column("caption_id"),
                "image_id": batch.column("image_id"),
                "text_sha256": pa.array([text_sha256(t or "") for t in texts]),
                "encoder_version": pa.array([self.version] * len(texts)),
                "dim": pa.array([dim] * len(texts), type=pa.int32()),
                "embedding": store_vectors(emb, self.store_dtype, ids),
                "reason": pa.array(reasons),
                "detail": pa.array(details),
                "encode_s": pa.array([encode_seconds / len(texts)] * len(texts)),  # the batch's time, shared by its rows
            }
        )


def store_vectors(emb: np.ndarray, store_dtype: str, caption_ids: list[str]) -> pa.FixedSizeListArray:
    """(n, dim) float32 embeddings as the store's fixed-size lists of `store_dtype`. A value
    beyond float16's +-65504 would be stored as inf: that fails, naming the caption and the key."""
    with np.errstate(over="ignore"):  # the overflow is checked just below
        stored = emb.astype(store_dtype)
    overflow = np.isfinite(emb).all(axis=1) & ~np.isfinite(stored).all(axis=1)
    if overflow.any():
        i = int(np.flatnonzero(overflow)[0])
        raise ValueError(f"embed.store_dtype {store_dtype}: the embedding of caption {caption_ids[i]} has a value of "
                         f"{np.abs(emb[i]).max():.6g}, beyond {store_dtype}'s range (it would be stored as inf); "
                         f"set embed.store_dtype: float32 for this encoder")
    return pa.FixedSizeListArray.from_arrays(pa.array(stored.reshape(-1)), emb.shape[1])


@ray.remote
def _probe_encoder(path: str, options: dict[str, Any], trust_remote_code: bool) -> tuple[str, int]:
    encoder = TextEncoder.from_pretrained(path, trust_remote_code=trust_remote_code, **options)
    return encoder.encoder_version, encoder.dim


def _encoder_of_version(cfg: PipelineConfig, version: str) -> str:
    """Where the encoder named by its `encoder_version` is: the path an earlier embed of it
    loaded (embedding-store lineage), else the registry version tagged with it."""
    embeddings = Store(cfg.store.uri, "embeddings")
    for commit in reversed(embeddings.commits(version)):
        path = commit.lineage.encoder_path
        if path and ("://" in path or Path(path).exists()):
            return path
    if cfg.mlflow.enabled:
        import mlflow

        client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
        for model in client.search_registered_models():
            for mv in client.search_model_versions(f"name='{model.name}'"):
                if mv.tags.get("encoder_version") == version:
                    return f"models:/{model.name}/{mv.version}"
    raise ValueError(f"embed.encoder: no encoder with encoder_version {version} is known: it embedded nothing in "
                     f"{cfg.store.uri} and no registered model version is tagged with it; give its path or MLflow URI")


def resolve_encoder(cfg: PipelineConfig) -> str:
    """The configured encoder as a reference its actors can load (a path, a hub id, a storage or
    MLflow model URI): an `encoder_version` (enc-...) is looked up. The actors resolve the
    reference themselves, into their node's model cache: a folder downloaded here would not
    exist on their nodes."""
    ref = cfg.embed.encoder or cfg.models.llm
    return _encoder_of_version(cfg, ref) if ref.startswith(ENCODER_VERSION_PREFIX) else ref


def _version_embedded_before(cfg: PipelineConfig, ref: str, options: dict[str, Any]) -> str | None:
    """The embedding version an earlier run of this encoder (same reference, same options)
    wrote, from the store's lineage: naming it needs no model load."""
    embeddings = Store(cfg.store.uri, "embeddings")
    for version in embeddings.versions():
        if any(c.lineage.encoder == ref and c.lineage.encoder_options == options for c in embeddings.commits(version)):
            return version
    return None


def dataset_images(cfg: PipelineConfig) -> pa.Array | None:
    """The image ids whose captions embed reads: the manifest version's, or None (every caption)."""
    manifest = Store(cfg.store.uri, "manifest")
    dataset = cfg.embed.dataset or cfg.ingest.dataset
    if not manifest.commits(dataset):
        return None
    return manifest.read(dataset, columns=["image_id"]).column("image_id").combine_chunks()


# Membership by Arrow's hash lookup: np.isin on object (string) arrays compares every pair,
# which made a do-nothing re-run at 100k captions take two minutes.
def _of_images(batch: pa.Table, images: pa.Array) -> pa.Table:
    return batch.filter(pc.is_in(batch.column("image_id"), value_set=images))


def _ids(store: Store, version: str, column: str) -> pa.Array:
    """One column of a version as an array (empty when the version has no commit)."""
    if not store.commits(version):
        return pa.array([], pa.string())
    return store.read(version, columns=[column]).column(column).combine_chunks()


@dataclass(frozen=True)
class EmbedWork:
    """What an embed run of this config has to do, known without loading the encoder."""

    version: str | None  # None: this encoder (reference + options) has not embedded before
    wanted: int  # captions of its dataset's images in embed.caption_versions
    todo: int  # of them, neither embedded nor rejected by this encoder


def embed_work(cfg: PipelineConfig) -> EmbedWork:
    ecfg = cfg.embed
    captions = Store(cfg.store.uri, "captions")
    images = dataset_images(cfg)
    read = [captions.read(v, columns=["caption_id", "image_id"]) for v in ecfg.caption_versions]
    wanted = pc.unique(pa.chunked_array([(_of_images(t, images) if images is not None else t).column("caption_id") for t in read],
                                        pa.string()))
    version = _version_embedded_before(cfg, ecfg.encoder or cfg.models.llm, encoder_kwargs(ecfg))
    if version is None:
        return EmbedWork(None, len(wanted), len(wanted))
    done = pa.concat_arrays([_ids(Store(cfg.store.uri, "embeddings"), version, "caption_id"), _still_rejected(cfg, version)])
    return EmbedWork(version, len(wanted), len(wanted) - int(pc.sum(pc.is_in(wanted, value_set=done)).as_py() or 0))


def _still_rejected(cfg: PipelineConfig, version: str) -> pa.Array:
    """Captions this encoder rejected that this config would reject again: an empty caption
    always, an overlong one only while embed.overlong is reject (truncate embeds it)."""
    rejects = Store(cfg.store.uri, "rejects")
    if not rejects.commits(f"embed.{version}"):
        return pa.array([], pa.string())
    standing = pa.array(["empty_caption"] + (["too_long"] if cfg.embed.overlong == "reject" else []))
    rows = rejects.read(f"embed.{version}", columns=["record_id", "reason"])
    return rows.filter(pc.is_in(rows.column("reason"), value_set=standing)).column("record_id").combine_chunks()


def plan_embed(cfg: PipelineConfig, stage: str = "embed") -> StagePlan:
    """Skipped when every caption of `embed.caption_versions` is embedded (or rejected) by the
    encoder; a new encoder's version is its weights' hash, named when the stage runs."""
    ecfg = cfg.embed
    captions = Store(cfg.store.uri, "captions")
    missing = [v for v in ecfg.caption_versions if not captions.commits(v)]
    if missing:
        return not_ready(stage, f"captions {', '.join(missing)}")
    work = embed_work(cfg)
    if work.version is None:
        return StagePlan(stage, "", False, f"encoder {ecfg.encoder or cfg.models.llm} has not embedded before")
    if work.todo == 0:
        return StagePlan(stage, work.version, True, f"all {work.wanted} captions of {', '.join(ecfg.caption_versions)} embedded")
    return StagePlan(stage, work.version, False, f"{work.todo} of {work.wanted} captions to embed")


def run_embed(cfg: PipelineConfig, tracker: Tracker) -> EmbedResult:
    ecfg = cfg.embed
    use_gpu = ecfg.gpus_per_actor > 0
    options = encoder_kwargs(ecfg)
    precision = resolve_precision(ecfg.precision, use_gpu)
    missing = [v for v in ecfg.caption_versions if not Store(cfg.store.uri, "captions").commits(v)]
    if not missing and (work := embed_work(cfg)).version and work.todo == 0:
        return _nothing_to_do(cfg, work, precision, tracker)  # no encoder load, no actor
    laps = Laps()
    path = resolve_encoder(cfg)
    # The output version is the encoder's identity; a small task computes it off the driver.
    version, dim = ray.get(_probe_encoder.options(num_cpus=ecfg.cpus_per_actor, num_gpus=ecfg.gpus_per_actor, resources=ecfg.resources_per_actor).remote(path, options, cfg.models.trust_remote_code))
    result = EmbedResult(encoder=cfg.embed.encoder or cfg.models.llm, encoder_version=version, dim=dim, precision=precision)
    result.tracked_by(tracker)
    laps("probe_encoder")

    captions = Store(cfg.store.uri, "captions")
    embeddings = Store(cfg.store.uri, "embeddings")
    rejects = Store(cfg.store.uri, "rejects")
    files = [f for v in ecfg.caption_versions for f in captions.files(v)]
    missing = [v for v in ecfg.caption_versions if not captions.commits(v)]
    if missing:
        raise ValueError(f"caption versions {missing} do not exist in {cfg.store.uri}; have {captions.versions()}")
    existing = _ids(embeddings, version, "caption_id")
    # A version holds one element type: one written as float32 before keeps growing as float32.
    store_type = embeddings.vector_type(version) or STORE_DTYPES[ecfg.store_dtype]
    result.store_dtype = next(name for name, t in STORE_DTYPES.items() if t == store_type)
    images = dataset_images(cfg)
    lineage = Lineage(stage="embed", inputs=[StoreInput("captions", v, [c.commit_id for c in captions.commits(v)]) for v in ecfg.caption_versions]
                      + ([StoreInput("manifest", ecfg.dataset or cfg.ingest.dataset)] if images is not None else []),
                      encoder=result.encoder, encoder_path=path, encoder_options=options, encoder_version=version, dim=dim,
                      config=ecfg.model_dump(mode="json"), code=code_version(), mlflow_run_id=tracker.run_id)
    start = utc_now()
    ds = ray.data.read_parquet(files, filesystem=captions.fs, columns=["caption_id", "image_id", "text"])
    if images is not None:
        ds = ds.map_batches(_of_images, fn_kwargs={"images": images}, batch_format="pyarrow")
    result.input_rows = ds.count()
    laps("read_and_count")
    todo = ds.map_batches(_not_in, fn_kwargs={"existing": existing}, batch_format="pyarrow") if len(existing) else ds
    # Small stores are one Parquet file = one block = one busy actor: split so every actor
    # works. Materialised first (ids and text only): actors that hold every CPU would
    # otherwise starve the read tasks that feed them.
    todo = todo.repartition(max(pool_bounds(ecfg.actors)[1], -(-result.input_rows // ecfg.batch_size))).materialize()
    laps("filter_and_split")
    embedded = todo.map_batches(
        EmbedCaptions,
        fn_constructor_kwargs=dict(
            path=path, options=options, precision=precision, use_gpu=use_gpu, overlong=ecfg.overlong,
            micro_batch_size=ecfg.micro_batch_size, trust_remote_code=cfg.models.trust_remote_code, store_dtype=result.store_dtype,
        ),
        batch_size=ecfg.batch_size,
        batch_format="pyarrow",
        compute=actor_pool(ecfg.actors),
        num_cpus=ecfg.cpus_per_actor,
        num_gpus=ecfg.gpus_per_actor,
        resources=ecfg.resources_per_actor or None,
    ).materialize()
    laps("actors")  # their start (one model load each) and their batches
    status_schema = pa.schema([("caption_id", pa.string()), ("reason", pa.string()), ("detail", pa.string()), ("encode_s", pa.float64())])
    refs = embedded.select_columns(status_schema.names).to_arrow_refs()
    blocks = [t for t in ray.get(refs) if t.num_rows]  # all skipped: no blocks
    status = pa.concat_tables([t.select(status_schema.names).cast(status_schema) for t in blocks]) if blocks else status_schema.empty_table()
    rejected = status.filter(pc.not_equal(status.column("reason"), ""))
    result.truncated = int(pc.sum(pc.equal(status.column("detail"), "truncated")).as_py() or 0)
    result.encode_seconds = round(float(pc.sum(status.column("encode_s")).as_py() or 0.0), 3)
    laps("status")
    with embeddings.begin(version, lineage, value_type=store_type) as txn:
        write_files(embedded.map_batches(_accepted, batch_format="pyarrow"), txn)
        commit = txn.commit({"input_rows": result.input_rows, "rejected": rejected.num_rows})
    laps("write_and_commit")
    result.seconds = (utc_now() - start).total_seconds()
    result.commit = commit.commit_id if commit else None
    result.written = commit.num_rows if commit else 0
    result.rejected = rejected.num_rows
    result.skipped = result.input_rows - status.num_rows
    result.reject_reasons = dict(Counter(rejected.column("reason").to_pylist()))
    if rejected.num_rows:
        now = utc_now()
        columns = (rejected.column(n).to_pylist() for n in ("caption_id", "reason", "detail"))
        rows = [reject_row("embed", c, r, d, now) for c, r, d in zip(*columns)]
        rejects.append(f"embed.{version}", pa.Table.from_pylist(rows, schema=STORE_SCHEMAS["rejects"]), lineage)
    if result.input_rows != result.written + result.skipped + result.rejected:
        raise RuntimeError(f"embed counts do not reconcile: {result}")

    if ecfg.cra_split:
        result.cra = held_out_cra(cfg, version, ecfg.cra_split)
    laps("rejects_and_cra")
    result.phases = laps.seconds
    tracker.set_tags({"llm2clip.output.embeddings": version, "llm2clip.encoder": result.encoder, "llm2clip.store_uri": cfg.store.uri})
    tracker.log_metrics(
        {"input_rows": result.input_rows, "written": result.written, "skipped": result.skipped, "rejected": result.rejected,
         "truncated": result.truncated, "captions_per_s": result.written / result.seconds if result.seconds else 0.0}
        | {f"cra.{k}": v.cra for k, v in result.cra.items()}
    )
    tracker.log_result(result, "embed")
    return result


def _nothing_to_do(cfg: PipelineConfig, work: EmbedWork, precision: str, tracker: Tracker) -> EmbedResult:
    embeddings = Store(cfg.store.uri, "embeddings")
    commits = embeddings.commits(work.version)
    dim = next(c.lineage.dim for c in commits if c.lineage.dim is not None)
    stored = embeddings.vector_type(work.version, commits)  # whatever embed.store_dtype says now: the store dtype is no skip key
    result = EmbedResult(encoder=cfg.embed.encoder or cfg.models.llm, encoder_version=work.version, dim=dim, precision=precision,
                         input_rows=work.wanted, skipped=work.wanted,
                         store_dtype=next((name for name, t in STORE_DTYPES.items() if t == stored), ""))
    result.tracked_by(tracker)
    if cfg.embed.cra_split:
        result.cra = held_out_cra(cfg, work.version, cfg.embed.cra_split)
    tracker.set_tags({"llm2clip.output.embeddings": work.version, "llm2clip.encoder": result.encoder, "llm2clip.store_uri": cfg.store.uri})
    tracker.log_metrics({"input_rows": result.input_rows, "written": 0, "skipped": result.skipped, "rejected": 0})
    tracker.log_result(result, "embed")
    return result


def write_files(ds, txn: Transaction, rows_per_file: int = ROWS_PER_FILE) -> None:
    """Ray Data writes a dataset into a commit's staging folder as Parquet files of `rows_per_file`
    to twice as many rows: write tasks gather small blocks up to `rows_per_file` rows, and split
    none beyond twice that (only a commit's last file holds fewer)."""
    ds.write_parquet(txn.staging_dir, filesystem=txn.store.fs, min_rows_per_file=rows_per_file, max_rows_per_file=2 * rows_per_file)


def _accepted(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.equal(batch.column("reason"), "")).drop_columns(["reason", "detail", "encode_s"])


def _not_in(batch: pa.Table, existing: pa.Array) -> pa.Table:
    return batch.filter(pc.invert(pc.is_in(batch.column("caption_id"), value_set=existing)))


def held_out_cra(cfg: PipelineConfig, encoder_version: str, split: str) -> dict[str, HeldOutCra]:
    """CRA of this encoder on the held-out split's caption pairs, per protocol."""
    manifest = Store(cfg.store.uri, "manifest").read(cfg.ingest.dataset)
    captions = Store(cfg.store.uri, "captions")
    caption_rows = pa.concat_tables([captions.read(v) for v in cfg.embed.caption_versions])
    emb = Store(cfg.store.uri, "embeddings").read(encoder_version, columns=["caption_id", "embedding"])
    index = {c: i for i, c in enumerate(emb.column("caption_id").to_pylist())}
    matrix = embedding_matrix(emb.column("embedding")) if emb.num_rows else None  # float16 in the store, float32 here
    out = {}
    for protocol in PROTOCOLS:
        pairs = [(a, b) for a, b in caption_pairs(manifest, caption_rows, split, protocol) if a in index and b in index]
        if len(pairs) >= 2:
            first = matrix[[index[a] for a, _ in pairs]]
            second = matrix[[index[b] for _, b in pairs]]
            out[protocol] = HeldOutCra(caption_retrieval_accuracy(first, second), len(pairs), split,
                                       f"{protocol}: each of 2N captions retrieves among the other 2N-1 by cosine, top-1")
    return out
