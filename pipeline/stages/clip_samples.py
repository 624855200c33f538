"""What a train-clip run trains on: its inputs, resolved once, and its samples, joined once.

`ClipInputs.resolve` names everything a run of a config reads: the text side (an embedding-store
version, or caption text for the CLIP text tower), the caption versions, the vision backbone,
and where its samples live. A run, its plan and a sweep all start from it.

The samples (nothing is joined on the driver): the caption rows of the configured versions
are joined to the embedding-store version on caption_id, grouped into one row per image, and
joined to the manifest on image_id, in Ray Data (or, up to 100k caption rows, in one Ray task
with Arrow: the hash joins' processes cost more than such a join). Images without a usable
caption are counted and left out (the run fails below `min_coverage`). The training samples are
ordered by a seeded hash of their image id (a distributed sort) and numbered along that order, so a
checkpoint's data position (a bitmap of sample ids) means the same samples on every run of the
same content. They are written once to `{storage}/samples/{key}`; every run of the same inputs
reads them from there. Every epoch, Ray Data CPU tasks read, check, decode and randomly crop
each image and draw its caption.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import ray

from pipeline.captioning import configured_caption_version
from pipeline.clip_data import PAYLOAD, TextStandardisation, embedding_moments, order_key, prepare_batch, sample_digest, standardisation
from pipeline.config import PipelineConfig
from pipeline.stages.trainer import storage_path
from pipeline.store import Store, read_record, resolve_filesystem, utc_now, write_record
from pipeline.text_encoder import ENCODER_VERSION_PREFIX
from pipeline.versioning import rows_digest, stable_hash

META_FILE = "meta.json"  # written last: a samples folder without it is an interrupted write
RECAPTION = "recaption"  # in caption_weights / eval_captions: the version the recaption section writes
M = TypeVar("M")


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
    """The text side of the config's run. An encoder given by path is loaded once, in a Ray task, to learn its version."""
    tc = cfg.train_clip
    if tc.text_tower == "clip":
        return TextSource("clip")
    embeddings = Store(cfg.store.uri, "embeddings")
    ref = tc.encoder or cfg.models.llm
    if ref.startswith(ENCODER_VERSION_PREFIX):  # an embedding-store version, named by its encoder
        version, encoder_ref = ref, None
    else:  # a path, hub id, storage or MLflow URI: the encoder knows its version
        (version, _), encoder_ref = ray.get(_saved_encoder_version.remote(ref)), ref
    commits = embeddings.commits(version)
    if not commits:
        raise ValueError(f"train_clip.encoder: the embedding store has no version {version} (from {ref}); write it first with "
                         f"`python -m jobs.embed --config CONFIG --set embed.encoder={ref}`; have {embeddings.versions()}")
    if encoder_ref is None:  # how the embeddings were made: the encoder an embed run loaded
        encoder_ref = next((c.lineage.encoder for c in reversed(commits) if c.lineage.encoder), None)
    return TextSource("llm", version, encoder_ref, next(c.lineage.dim for c in commits if c.lineage.dim is not None))


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
        names = list(dict.fromkeys([*tc.caption_weights, *tc.eval_captions.values()]))
        named = {n: configured_caption_version(cfg) if n == RECAPTION else n for n in names}
        return cls(named, tuple(sorted({named[n] for n, w in tc.caption_weights.items() if w > 0})),
                   tuple(sorted({named[n] for n in tc.eval_captions.values()})))


@dataclass(frozen=True)
class SamplesMeta:
    """What a joined samples folder holds (its `meta.json`)."""

    num_train: int
    num_val: int
    digest: str  # the content of the training samples: each image with its trained caption ids
    missing: dict[str, list[str]]  # split -> image ids without a usable caption
    images: dict[str, int]  # split -> images of the manifest in it
    versions: list[str]
    encoder_version: str | None
    created_at: str


@dataclass(frozen=True)
class SampleRows:
    """The joined, numbered samples on storage: `{root}/train`, `{root}/val` (Parquet) and their meta."""

    fs: Any
    root: str  # {storage}/samples/{key}
    key: str  # `samples_key`: what they are made of
    meta: SamplesMeta | None  # None: not joined yet


def read_meta(fs, root: str, kind: type[M] = SamplesMeta) -> M | None:
    """The meta record a completed folder of joined rows holds, else None."""
    return read_record(fs, f"{root}/{META_FILE}", kind)


def write_meta(fs, root: str, meta: Any) -> None:
    write_record(fs, f"{root}/{META_FILE}", meta)


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


def sample_rows(cfg: PipelineConfig, source: TextSource, captions: CaptionPlan, storage: str) -> SampleRows:
    """Where the samples of these inputs live, and their meta if they are joined already."""
    key = samples_key(cfg, source, captions)
    fs, root = resolve_filesystem(f"{storage.rstrip('/')}/samples/{key}")
    return SampleRows(fs, root, key, read_meta(fs, root))


@dataclass(frozen=True)
class ClipInputs:
    """What a train-clip run of a config reads, resolved once."""

    source: TextSource
    captions: CaptionPlan
    vision: str  # the vision backbone (path, hub id or URI)
    clip_text: str | None  # the CLIP text tower (text_tower: clip)
    storage: str  # the run's storage path (training runs, samples)
    samples: SampleRows

    @classmethod
    def resolve(cls, cfg: PipelineConfig, source: TextSource | None = None) -> ClipInputs:
        """Raises ValueError, naming the config key, when an input does not exist (yet). `source`:
        the text side when the caller resolved it already (a sweep's trials)."""
        tc = cfg.train_clip
        vision = tc.vision_model or cfg.models.vision
        if not vision:
            raise ValueError("train_clip.vision_model (or models.vision) must name a vision backbone")
        clip_text = cfg.models.clip_text if tc.text_tower == "clip" else None
        if tc.text_tower == "clip" and not clip_text:
            raise ValueError("train_clip.text_tower: clip needs models.clip_text (a CLIPTextModel folder; `make models` builds tiny-clip-text)")
        source, captions, storage = source or text_source(cfg), CaptionPlan.of(cfg), storage_path(tc.settings(), cfg.storage)
        return cls(source, captions, vision, clip_text, storage, sample_rows(cfg, source, captions, storage))

    def joined(self, cfg: PipelineConfig) -> ClipInputs:
        """These inputs with their samples joined (now, if no earlier run did); fails when too few images are usable."""
        meta = self.samples.meta or join_samples(cfg, self.source, self.captions, self.samples.fs, self.samples.root)
        tc = cfg.train_clip
        for split, total in meta.images.items():
            missing = len(meta.missing[split])
            if total == 0:
                raise ValueError(f"train_clip: the manifest {tc.dataset or cfg.ingest.dataset!r} has no {split!r} images")
            if 1 - missing / total < tc.min_coverage:
                wanted = self.captions.trained if split == tc.train_split else self.captions.evaluated
                encoder = f" with an embedding of {self.source.encoder_version}" if self.source.encoder_version else ""
                raise ValueError(f"train_clip: only {total - missing} of {total} {split} images have a caption in {list(wanted)}{encoder} "
                                 f"(train_clip.min_coverage {tc.min_coverage}); embed the missing captions first "
                                 f"(jobs.embed with embed.caption_versions={self.captions.versions})")
        return replace(self, samples=replace(self.samples, meta=meta))


@dataclass
class SampleData:
    train: Any  # ray Dataset of numbered training samples, through the training image pipeline
    val: Any  # ray Dataset of prepared (decoded, centre-cropped) validation samples
    meta: SamplesMeta
    text_standardisation: TextStandardisation | None = None  # the adapter's input (train_clip.standardise_text)

    @property
    def datasets(self) -> dict[str, Any]:
        return {"train": self.train, "val": self.val}


def load_samples(cfg: PipelineConfig, inputs: ClipInputs) -> SampleData:
    """The joined samples (`ClipInputs.joined`) through this run's image pipeline."""
    from pipeline.image_transforms import ImageSpec
    from pipeline.model_refs import local_path

    tc = cfg.train_clip
    rows = inputs.joined(cfg).samples
    size = tc.image_size or ImageSpec.from_processor(local_path(inputs.vision)).size
    prep = dict(size=size, payload=PAYLOAD[inputs.source.tower], max_bytes=cfg.ingest.limits.max_bytes)
    val = ray.data.read_parquet(f"{rows.root}/val", filesystem=rows.fs).map_batches(
        prepare_batch, fn_kwargs=dict(**prep, train=False), batch_format="pyarrow", batch_size=64).materialize()
    val.context.enable_progress_bars = False  # read by rank 0 in the background of training: its bar never closed
    weights = {inputs.captions.named[n]: w for n, w in tc.caption_weights.items()}
    train = ray.data.read_parquet(f"{rows.root}/train", filesystem=rows.fs).randomize_block_order().map_batches(
        prepare_batch, fn_kwargs=dict(**prep, train=True, crop_scale=tc.crop_scale, weights=weights), batch_format="pyarrow", batch_size=64)
    stats = None
    if tc.standardise_text and prep["payload"] == "embedding":
        stats = text_standardisation(ray.data.read_parquet(f"{rows.root}/train", filesystem=rows.fs, columns=["embedding"]))
    return SampleData(train, val, rows.meta, stats)


def text_standardisation(ds) -> TextStandardisation:
    """The adapter's input standardisation from a dataset's `embedding` column (one pass, summed
    per block)."""
    ds.context.enable_progress_bars = False  # a second or two: no bar
    return standardisation(ds.select_columns(["embedding"]).map_batches(embedding_moments, batch_format="pyarrow", batch_size=None).take_all())


# ----------------------------------------------------------------- the join
def _collect_captions(group: pa.Table, payload: str) -> pa.Table:
    """One image's caption rows -> one row with lists (ordered by version, then caption id)."""
    order = pc.sort_indices(group, sort_keys=[("caption_version", "ascending"), ("caption_id", "ascending")])
    group = group.take(order)

    def as_list(column: str) -> pa.Array:
        values = group.column(column).combine_chunks()
        return pa.ListArray.from_arrays(pa.array([0, len(values)], type=pa.int32()), values)
    return pa.table({"image_id": group.column("image_id").slice(0, 1), "caption_id": as_list("caption_id"),
                     "caption_version": as_list("caption_version"), payload: as_list(payload)})


def _number_block(block: pa.Table, first_id: int, trained_versions: list[str]) -> tuple[pa.Table, int]:
    """Sample ids first_id.. along the block's (sorted) order, and the digest of what the block
    trains on: each image with the ids of its captions in the trained versions."""
    if "order_key" not in block.column_names:  # an empty Ray Data block may have no columns at all
        return block, 0
    ids = pa.array(np.arange(first_id, first_id + block.num_rows, dtype=np.int64))
    rows = zip(block.column("image_id").to_pylist(), block.column("caption_id").to_pylist(), block.column("caption_version").to_pylist())
    digest = sum(sample_digest(image, [c for c, v in zip(caps, versions) if v in trained_versions]) for image, caps, versions in rows)
    return block.drop_columns(["order_key"]).append_column("sample_id", ids), digest


_number = ray.remote(num_returns=2)(_number_block)


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
    # Empty blocks (a filter that kept nothing of a partition) may have no schema: leave them out.
    kept = [(r, n) for r, n in zip(refs, sizes) if n] or list(zip(refs, sizes))[:1]
    refs, sizes = [r for r, _ in kept], [n for _, n in kept]
    numbered, digests, first = [], [], 0
    for ref, size in zip(refs, sizes):
        block, digest = _number.remote(ref, first, trained_versions)
        numbered.append(block)
        digests.append(digest)
        first += size
    total_digest = sum(ray.get(digests)) % (1 << 64)
    return ray.data.from_arrow_refs(numbered), first, total_digest


def _mark_usable(batch: pa.Table, wanted: dict[str, tuple[str, ...]]) -> pa.Table:
    """Append `usable`: the image has a caption in a version its split needs."""
    usable = [versions is not None and any(v in wanted[split] for v in versions)
              for split, versions in zip(batch.column("split").to_pylist(), batch.column("caption_version").to_pylist())]
    return batch.append_column("usable", pa.array(usable, type=pa.bool_()))


def _tally_block(block: pa.Table) -> tuple[Counter, dict[str, list[str]]]:
    """Images per split in a block, and the ids of those that are not usable."""
    missing: dict[str, list[str]] = {}
    for image_id, split, usable in zip(*(block.column(c).to_pylist() for c in ("image_id", "split", "usable"))):
        if not usable:
            missing.setdefault(split, []).append(image_id)
    return Counter(block.column("split").to_pylist()), missing


_tally = ray.remote(_tally_block)


ROWS_PER_PARTITION = 100_000


def join_samples(cfg: PipelineConfig, source: TextSource, captions: CaptionPlan, fs, root: str, one_task: bool | None = None) -> SamplesMeta:
    """Join captions (and their embeddings) into one row per image and that to the manifest;
    count and leave out images without a usable caption; number the samples; write them under
    `root`, the meta last. Up to one hash partition's worth of caption rows (`one_task` None) the
    join runs in one Ray task with Arrow, as the same steps; beyond, in Ray Data's hash joins,
    whose aggregator processes cost ~30 s to start here, whatever the size."""
    tc = cfg.train_clip
    payload = PAYLOAD[source.tower]
    caption_store, manifest = Store(cfg.store.uri, "captions"), Store(cfg.store.uri, "manifest")
    # A hash partition (one aggregator process each) per ~100k caption rows, up to the cluster's
    # CPUs: a small join spread over every CPU of a big cluster pays more in processes than it saves.
    caption_rows = sum(caption_store.num_rows(v) for v in captions.versions)
    wanted = {tc.train_split: captions.trained, tc.val_split: captions.evaluated}
    if fs.get_file_info(root).type != pafs.FileType.NotFound:
        fs.delete_dir(root)  # an interrupted write
    if one_task if one_task is not None else caption_rows <= ROWS_PER_PARTITION:
        num_train, num_val, digest, missing, totals = ray.get(_join_in_one_task.remote(
            cfg.store.uri, captions.versions, source.encoder_version if payload == "embedding" else None, tc.dataset or cfg.ingest.dataset,
            payload, wanted, (tc.train_split, tc.val_split), tc.seed, captions.trained, fs, root))
        meta = SamplesMeta(num_train, num_val, f"{digest:016x}", missing, {s: totals.get(s, 0) for s in wanted}, captions.versions,
                           source.encoder_version, utc_now().isoformat())
        write_meta(fs, root, meta)
        return meta
    partitions = max(2, min(int(ray.cluster_resources().get("CPU", 2)), caption_rows // ROWS_PER_PARTITION + 1))
    rows = ray.data.read_parquet([f for v in captions.versions for f in caption_store.files(v)], filesystem=caption_store.fs).select_columns(
        ["caption_id", "image_id", "caption_version"] + (["text"] if payload == "text" else []))
    if payload == "embedding":  # float16 vectors (older versions float32) go through as stored: readers cast to float32
        embeddings = Store(cfg.store.uri, "embeddings")
        vectors = ray.data.read_parquet(embeddings.files(source.encoder_version), filesystem=embeddings.fs).select_columns(
            ["caption_id", "embedding"])
        rows = rows.join(vectors, "inner", num_partitions=partitions, on=("caption_id",))
    per_image = rows.groupby("image_id", num_partitions=partitions).map_groups(
        _collect_captions, fn_kwargs={"payload": payload}, batch_format="pyarrow")
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

    train, num_train, digest = _numbered(of_split(tc.train_split), tc.seed, captions.trained)
    val, num_val, _ = _numbered(of_split(tc.val_split), tc.seed, captions.trained, ordered=False)  # never trained: any ids do
    train.write_parquet(f"{root}/train", filesystem=fs)
    val.write_parquet(f"{root}/val", filesystem=fs)
    meta = SamplesMeta(num_train, num_val, f"{digest:016x}", missing, {s: totals.get(s, 0) for s in wanted}, captions.versions,
                       source.encoder_version, utc_now().isoformat())
    write_meta(fs, root, meta)
    return meta



@ray.remote
def _join_in_one_task(store_uri: str, versions: list[str], encoder_version: str | None, dataset: str, payload: str,
                      wanted: dict[str, tuple[str, ...]], splits: tuple[str, str], seed: int, trained_versions: list[str], fs, root: str):
    """`join_samples`' steps on Arrow tables in one task (any node: everything is read from and
    written to storage): captions (with their embeddings) into one row per image, ordered by
    version then caption id; that onto the manifest's images; usable marked and tallied; the
    training samples numbered along their seeded order key. Returns (num_train, num_val, digest,
    missing, totals)."""
    import pyarrow.parquet as pq

    captions, manifest = Store(store_uri, "captions"), Store(store_uri, "manifest")
    rows = pa.concat_tables([captions.read(v, columns=["caption_id", "image_id", "caption_version"] + (["text"] if payload == "text" else []))
                             for v in versions])
    if payload == "embedding":  # inner join on caption_id, by position (Arrow's hash join takes no list columns)
        vectors = Store(store_uri, "embeddings").read(encoder_version, columns=["caption_id", "embedding"])
        at = pc.index_in(rows.column("caption_id"), value_set=vectors.column("caption_id"))
        rows = rows.filter(pc.is_valid(at)).append_column("embedding", vectors.column("embedding").take(at.filter(pc.is_valid(at))))
    rows = rows.sort_by([("image_id", "ascending"), ("caption_version", "ascending"), ("caption_id", "ascending")])
    image_ids = rows.column("image_id").combine_chunks()
    starts = np.flatnonzero(np.r_[True, image_ids.slice(1).to_numpy(zero_copy_only=False) != image_ids.slice(0, len(image_ids) - 1)
                                  .to_numpy(zero_copy_only=False)]) if len(image_ids) else np.zeros(0, dtype=np.int64)
    offsets = pa.array(np.r_[starts, len(image_ids)].astype(np.int32))
    per_image = pa.table({"image_id": image_ids.take(pa.array(starts))} | {
        c: pa.ListArray.from_arrays(offsets, rows.column(c).combine_chunks()) for c in ("caption_id", "caption_version", payload)})
    images = manifest.read(dataset, columns=["image_id", "uri", "sha256", "split"])
    images = images.filter(pc.is_in(images.column("split"), value_set=pa.array(list(wanted), type=pa.string())))
    at = pc.index_in(images.column("image_id"), value_set=per_image.column("image_id"))  # left outer: null where none
    joined = images.combine_chunks()
    for column in ("caption_id", "caption_version", payload):
        joined = joined.append_column(column, per_image.column(column).take(at))
    joined = _mark_usable(joined, wanted)
    totals, missing = _tally_block(joined)
    missing = {split: missing.get(split, []) for split in wanted} | missing

    def of_split(split: str) -> pa.Table:
        keep = pc.and_(pc.equal(joined.column("split"), split), joined.column("usable"))
        return joined.filter(keep).drop_columns(["split", "usable"])

    counts, digests = {}, {}
    for name, split in zip(("train", "val"), splits):  # val is never trained: its ids are any ids, these as good as others
        table = of_split(split)
        table = table.append_column("order_key", pa.array([order_key(seed, i) for i in table.column("image_id").to_pylist()], type=pa.int64()))
        table, digests[name] = _number_block(table.sort_by("order_key"), 0, trained_versions)
        counts[name] = table.num_rows
        fs.create_dir(f"{root}/{name}", recursive=True)
        pq.write_table(table, f"{root}/{name}/0.parquet", filesystem=fs)
    return counts["train"], counts["val"], digests["train"] % (1 << 64), missing, totals
