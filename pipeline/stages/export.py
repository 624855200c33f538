"""`export`: a manifest version as WebDataset shards that open_clip's loader reads.

    python -m jobs.export --config configs/local.yaml --set export.encoder_version=enc-...

Per image one sample keyed by its image_id (`pipeline.webdataset_io`):
  `{key}.jpg|png|webp` the image bytes as ingested (read through `images.read_ingested_bytes`,
                       which checks the sha256; other formats re-encoded as PNG),
  `{key}.txt`          the chosen caption: the first caption of the first `export.caption_versions`
                       entry the image has (with an encoder version: the first that has an embedding),
  `{key}.json`         image_id, split, uri, sha256, width, height and every chosen caption
                       (caption_id, caption_version, text) in order,
  `{key}.npy`          (with `export.encoder_version`) the captions' embeddings in that order,
                       shape (n_captions, dim), `export.embedding_dtype`.
Captions are ordered by `caption_versions`, then by their place in the manifest's `captions`
list (the listing's order: the .txt of an ingested listing is its first alt-text), then by
caption_id. Images keep the manifest's order (its commits, files and rows: the order they
were ingested) and image number i goes to shard i // samples_per_shard, so names and contents
are the same on every run of the same inputs (open_clip shuffles shards and samples itself); an image whose bytes are gone or changed, or that has no
caption, is counted and recorded in the rejects store (`export.{dataset}`), and its shard is
one sample short. Counts reconcile: images = samples + rejected.

All the work is Ray Data and Ray tasks: the manifest numbered by one task per file, captions
joined to their embeddings (as bytes of the export dtype, whatever the store holds), the two
joined per image and grouped per shard; each shard's group is written by one task, streaming
its tar to `export.uri` (a path or s3://...). `sizes.json`, then `_index.json` (the
completion marker) are written last; a re-run of a complete export does nothing, an
interrupted or outdated one is cleared and written again.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from pipeline import uri
from pipeline.captioning import configured_caption_version
from pipeline.config import PipelineConfig
from pipeline.images import Reject, read_ingested_bytes
from pipeline.lineage import Lineage, StoreInput
from pipeline.plans import StagePlan, not_ready
from pipeline.records import Tracked, hidden, label, to_json
from pipeline.stages import tracking
from pipeline.store import Store, reject_row, utc_now
from pipeline.versioning import stable_hash
from pipeline.webdataset_io import (FORMAT_VERSION, ExportIndex, Sample, clear_export, image_member, json_bytes, npy_bytes,
                                    read_index, shard_name, shard_pattern, write_index, write_sizes, write_tar)
from schemas import STORE_SCHEMAS

RECAPTION = "recaption"  # in caption_versions: the version the recaption section writes
NO_CAPTION = "no_caption"
NO_CAPTION_EMBEDDING = "no_caption_embedding"
ROWS_PER_PARTITION = 100_000  # caption rows per hash partition of the joins (as clip_samples)


@dataclass
class ExportResult(Tracked):
    uri: str = label("shards at")
    urls: str = label("webdataset urls")
    dataset: str
    split: str | None
    images: int = 0
    samples: int = 0
    shards: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    captions: int = 0
    captions_without_embedding: int = 0
    encoder_version: str | None = None
    embedding_dtype: str | None = None
    dim: int | None = None
    already_written: bool = False
    seconds: float = hidden(default=0.0)

    def notes(self) -> dict[str, str | None]:
        if not self.samples:
            return {}
        return {"open_clip": f"python -m open_clip_train.main --dataset-type webdataset --train-data '{self.urls}' "
                             f"--train-num-samples {self.samples} ...",
                "samples/s": str(round(self.samples / self.seconds, 1)) if self.seconds and not self.already_written else None}


@dataclass(frozen=True)
class ExportInputs:
    """What an export of a config reads and where it writes, resolved on the driver (cheap: commit records)."""

    uri: str
    dataset: str
    split: str | None
    versions: list[str]  # caption versions, in the configured order
    encoder_version: str | None
    dim: int | None
    key: str  # the inputs' commits and the options: an index with this key is this export

    @classmethod
    def resolve(cls, cfg: PipelineConfig) -> ExportInputs:
        """Raises ValueError naming the config key when an input does not exist."""
        ec = cfg.export
        dataset = ec.dataset or cfg.ingest.dataset
        stores = {n: Store(cfg.store.uri, n) for n in ("manifest", "captions", "embeddings")}
        if not stores["manifest"].commits(dataset):
            raise ValueError(f"export.dataset: the manifest has no version {dataset!r}; have {stores['manifest'].versions()}")
        versions = list(dict.fromkeys(configured_caption_version(cfg) if v == RECAPTION else v for v in ec.caption_versions))
        missing = [v for v in versions if not stores["captions"].commits(v)]
        if missing:
            raise ValueError(f"export.caption_versions: {missing} do not exist; have {stores['captions'].versions()}")
        dim, embedded = None, None
        if ec.encoder_version:
            commits = stores["embeddings"].commits(ec.encoder_version)
            if not commits:
                raise ValueError(f"export.encoder_version: the embedding store has no version {ec.encoder_version!r}; "
                                 f"have {stores['embeddings'].versions()}")
            dim = next((c.lineage.dim for c in commits if c.lineage.dim is not None), None)
            embedded = [c.commit_id for c in commits]
        # Commit ids, not rows: a new commit (even another dataset's captions) redoes the export.
        key = stable_hash({"manifest": [c.commit_id for c in stores["manifest"].commits(dataset)],
                           "captions": {v: [c.commit_id for c in stores["captions"].commits(v)] for v in versions},
                           "embeddings": embedded, "split": ec.split, "versions": versions, "encoder_version": ec.encoder_version,
                           "dtype": ec.embedding_dtype if ec.encoder_version else None, "per_shard": ec.samples_per_shard,
                           "format": FORMAT_VERSION}, 16)
        default = uri.join(cfg.storage, "export", dataset if ec.split is None else f"{dataset}.{ec.split}")
        return cls(ec.uri or default, dataset, ec.split, versions, ec.encoder_version, dim, key)


def plan_export(cfg: PipelineConfig) -> StagePlan:
    """Skipped when the output's `_index.json` has this config's key (its inputs' commits and options)."""
    try:
        inputs = ExportInputs.resolve(cfg)
    except ValueError as e:
        return not_ready("export", str(e))
    index = read_index(inputs.uri)
    if index is not None and index.key == inputs.key:
        return StagePlan("export", inputs.uri, True, f"{index.samples} samples in {index.shards} shards written")
    return StagePlan("export", inputs.uri, False, "written for other inputs or options: rewrite" if index else "not written yet")


def run_export(cfg: PipelineConfig, tracker: tracking.Tracker) -> ExportResult:
    start = utc_now()
    inputs = ExportInputs.resolve(cfg)
    index = read_index(inputs.uri)
    if index is None or index.key != inputs.key:
        clear_export(inputs.uri)  # an interrupted or outdated export: no shard of it survives
        index = _export(cfg, inputs, tracker)
        already = False
    else:
        already = True
    result = ExportResult(uri=inputs.uri, urls=shard_pattern(inputs.uri, index.shards), dataset=index.dataset, split=index.split,
                          images=index.images, samples=index.samples, shards=index.shards, rejected=index.rejected,
                          captions=index.captions, captions_without_embedding=index.captions_without_embedding,
                          encoder_version=index.encoder_version, embedding_dtype=index.embedding_dtype, dim=index.dim,
                          already_written=already, seconds=(utc_now() - start).total_seconds())
    result.tracked_by(tracker)
    tracker.set_tags({"llm2clip.output.export": inputs.uri, "llm2clip.store_uri": cfg.store.uri})
    tracker.log_metrics({"images": result.images, "samples": result.samples, "shards": result.shards,
                         "rejected": sum(result.rejected.values()), "captions": result.captions,
                         "captions_without_embedding": result.captions_without_embedding, "already_written": int(already)})
    tracker.log_dict(to_json(index), "export/index.json")
    tracker.log_result(result, "export")
    return result


def _export(cfg: PipelineConfig, inputs: ExportInputs, tracker: tracking.Tracker) -> ExportIndex:
    ec = cfg.export
    manifest, captions = Store(cfg.store.uri, "manifest"), Store(cfg.store.uri, "captions")
    caption_rows = sum(captions.num_rows(v) for v in inputs.versions)
    partitions = max(2, min(int(ray.cluster_resources().get("CPU", 2)), caption_rows // ROWS_PER_PARTITION + 1))
    numbered, total = _numbered(manifest, inputs.dataset, inputs.split, ec.samples_per_shard)
    num_shards = -(-total // ec.samples_per_shard)
    counts, sizes, rejected = Counter(), {}, Counter()
    if total:
        rows = ray.data.read_parquet([f for v in inputs.versions for f in captions.files(v)], filesystem=captions.fs).select_columns(
            ["caption_id", "image_id", "caption_version", "text"])
        if inputs.encoder_version:
            embeddings = Store(cfg.store.uri, "embeddings")
            vectors = ray.data.read_parquet(embeddings.files(inputs.encoder_version), filesystem=embeddings.fs).select_columns(
                ["caption_id", "embedding"]).map_batches(_as_bytes, fn_kwargs={"dtype": ec.embedding_dtype}, batch_format="pyarrow",
                                                         batch_size=4096)
            rows = rows.join(vectors, "left_outer", num_partitions=partitions, on=("caption_id",))
        joined = numbered.join(rows, "left_outer", num_partitions=partitions, on=("image_id",))
        written = joined.groupby("shard", num_partitions=partitions).map_groups(
            _write_shard, batch_format="pyarrow", concurrency=ec.concurrency,
            fn_kwargs={"location": inputs.uri, "num_shards": num_shards, "versions": inputs.versions,
                       "dtype": ec.embedding_dtype if inputs.encoder_version else None, "max_bytes": cfg.ingest.limits.max_bytes,
                       "encoder_version": inputs.encoder_version})
        # One row per shard comes back (its counts and rejects), a few shards at a time.
        store = Store(cfg.store.uri, "rejects")
        lineage = Lineage(stage="export", inputs=[StoreInput("manifest", inputs.dataset)], mlflow_run_id=tracker.run_id)
        with store.begin(f"export.{inputs.dataset}", lineage) as txn:
            now = utc_now()
            for batch in written.iter_batches(batch_format="pyarrow", batch_size=16):
                for row in batch.select([c for c in batch.column_names if not c.startswith("reject_")]).to_pylist():
                    sizes[row["name"]] = row["samples"]
                    counts.update({k: row[k] for k in ("images", "samples", "captions", "captions_without_embedding")})
                reasons = batch.column("reject_reasons").combine_chunks().flatten().to_pylist()
                rejected.update(reasons)
                if reasons:
                    ids = batch.column("reject_ids").combine_chunks().flatten().to_pylist()
                    details = batch.column("reject_details").combine_chunks().flatten().to_pylist()
                    txn.write(pa.Table.from_pylist([reject_row("export", i, r, d, now) for i, r, d in zip(ids, reasons, details)],
                                                   schema=STORE_SCHEMAS["rejects"]))
            txn.commit()
    expected = {shard_name(i, num_shards) for i in range(num_shards)}
    if set(sizes) != expected or counts["images"] != total:  # every shard's group came back whole
        raise RuntimeError(f"export: wrote shards {sorted(sizes)[:5]}... for {counts['images']} images; expected {num_shards} "
                           f"shards for {total}")
    write_sizes(inputs.uri, dict(sorted(sizes.items())))
    index = ExportIndex(key=inputs.key, dataset=inputs.dataset, split=inputs.split, caption_versions=inputs.versions,
                        encoder_version=inputs.encoder_version, embedding_dtype=ec.embedding_dtype if inputs.encoder_version else None,
                        dim=inputs.dim, samples_per_shard=ec.samples_per_shard, shards=num_shards, images=total,
                        samples=counts["samples"], captions=counts["captions"],
                        captions_without_embedding=counts["captions_without_embedding"], rejected=dict(sorted(rejected.items())),
                        created_at=utc_now().isoformat(), mlflow_run_id=tracker.run_id)
    write_index(inputs.uri, index)  # last: the export is complete
    return index


# ----------------------------------------------------------------- numbering the images
IMAGE_COLUMNS = ["image_id", "uri", "sha256", "width", "height", "split", "captions"]


def _read_images(fs, path: str, split: str | None, columns: list[str]) -> pa.Table:
    table = pq.read_table(path, filesystem=fs, columns=columns)
    return table if split is None else table.filter(pc.equal(table.column("split"), split))


@ray.remote
def _count_images(fs, path: str, split: str | None) -> int:
    return _read_images(fs, path, split, ["split"]).num_rows


@ray.remote
def _number_images(fs, path: str, split: str | None, first: int, per_shard: int) -> pa.Table:
    table = _read_images(fs, path, split, IMAGE_COLUMNS)
    index = np.arange(first, first + table.num_rows, dtype=np.int64)
    return table.append_column("index", pa.array(index)).append_column("shard", pa.array(index // per_shard))


def _numbered(manifest: Store, dataset: str, split: str | None, per_shard: int) -> tuple[object, int]:
    """The images of a manifest version (of one split) numbered 0..n-1 in manifest order, each
    with its shard, and n: a task counts each file's images, another numbers them from the
    file's offset (no sort, no image id on the driver; a file is one commit's part)."""
    files = manifest.files(dataset)
    sizes = ray.get([_count_images.remote(manifest.fs, f, split) for f in files])
    numbered, first = [], 0
    for path, size in zip(files, sizes):
        if size:
            numbered.append(_number_images.remote(manifest.fs, path, split, first, per_shard))
            first += size
    return (ray.data.from_arrow_refs(numbered) if numbered else None), first


def _as_bytes(batch: pa.Table, dtype: str) -> pa.Table:
    """Each embedding as the raw bytes of a `dtype` vector: the store's float32 or float16 lists,
    carried through the joins at the export's width (and polars joins no float16)."""
    column = batch.column("embedding").combine_chunks()
    n = len(column)
    rows = column.flatten().to_numpy(zero_copy_only=False).astype(dtype).reshape(n, -1) if n else np.zeros((0, 0), dtype)
    offsets = np.arange(n + 1, dtype=np.int64) * rows.shape[1] * rows.itemsize
    vector = pa.Array.from_buffers(pa.large_binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(np.ascontiguousarray(rows))])
    return pa.table({"caption_id": batch.column("caption_id"), "vector": vector})


# ----------------------------------------------------------------- one shard
def _write_shard(rows: pa.Table, location: str, num_shards: int, versions: list[str], dtype: str | None, max_bytes: int,
                 encoder_version: str | None) -> pa.Table:
    """Write one shard's tar from its rows (one per image and caption; images without a caption
    have one row of nulls). Returns its counts and rejects as one row."""
    shard = rows.column("shard")[0].as_py()
    name = shard_name(shard, num_shards)
    per_image: dict[int, list[dict]] = {}
    for row in rows.to_pylist():
        per_image.setdefault(row["index"], []).append(row)
    counts = Counter(images=len(per_image))
    rejects: list[tuple[str, str, str]] = []

    def samples():
        for index in sorted(per_image):
            group = per_image[index]
            image, sample_or_reason = group[0], _sample(group, versions, dtype, max_bytes, encoder_version, counts)
            if isinstance(sample_or_reason, Sample):
                counts["samples"] += 1
                yield sample_or_reason
            else:
                rejects.append((image["image_id"], *sample_or_reason))

    write_tar(uri.join(location, name), samples())
    return pa.table({"name": [name], "images": [counts["images"]], "samples": [counts["samples"]], "captions": [counts["captions"]],
                     "captions_without_embedding": [counts["captions_without_embedding"]],
                     "reject_ids": [[i for i, _, _ in rejects]], "reject_reasons": [[r for _, r, _ in rejects]],
                     "reject_details": [[d for _, _, d in rejects]]},
                    schema=pa.schema([("name", pa.string()), ("images", pa.int64()), ("samples", pa.int64()), ("captions", pa.int64()),
                                      ("captions_without_embedding", pa.int64()), ("reject_ids", pa.list_(pa.string())),
                                      ("reject_reasons", pa.list_(pa.string())), ("reject_details", pa.list_(pa.string()))]))


def _sample(group: list[dict], versions: list[str], dtype: str | None, max_bytes: int, encoder_version: str | None,
            counts: Counter) -> Sample | tuple[str, str]:
    """One image's sample, or (reason, detail) why it has none."""
    image = group[0]
    listed = image["captions"] or []
    rank = {v: i for i, v in enumerate(versions)}
    captions = sorted((r for r in group if r["caption_id"] is not None),
                      key=lambda r: (rank[r["caption_version"]], listed.index(r["text"]) if r["text"] in listed else len(listed),
                                     r["caption_id"]))
    if dtype is not None:
        embedded = [r for r in captions if r["vector"] is not None]
        counts["captions_without_embedding"] += len(captions) - len(embedded)
        if captions and not embedded:
            return NO_CAPTION_EMBEDDING, f"no caption of {versions} has an embedding in {encoder_version}"
        captions = embedded
    if not captions:
        return NO_CAPTION, f"no caption in {versions}"
    data, reason, detail = read_ingested_bytes(image["uri"], image["sha256"], max_bytes)
    if data is None:
        return reason, detail
    try:
        ext, payload, converted_from = image_member(data)
    except Exception as e:  # noqa: BLE001 - bytes that hash right but do not decode: a reject, not a failed job
        return Reject.NOT_AN_IMAGE, f"{type(e).__name__}: {e}"
    meta = {"image_id": image["image_id"], "split": image["split"], "uri": image["uri"], "sha256": image["sha256"],
            "width": image["width"], "height": image["height"],
            "captions": [{"caption_id": r["caption_id"], "caption_version": r["caption_version"], "text": r["text"]} for r in captions]}
    if converted_from:
        meta["converted_from"] = converted_from  # the bytes are a PNG of the ingested image, not its bytes
    if dtype is not None:
        meta |= {"encoder_version": encoder_version, "embedding_dtype": dtype}
    members = {ext: payload, "txt": captions[0]["text"].encode(), "json": json_bytes(meta)}
    if dtype is not None:  # row i is the embedding of meta["captions"][i]
        members["npy"] = npy_bytes(np.stack([np.frombuffer(r["vector"], dtype=dtype) for r in captions]))
    counts["captions"] += len(captions)
    return Sample(image["image_id"], members)
