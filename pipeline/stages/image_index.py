"""The image index `jobs.serve` searches: a trained model's unit image embeddings of one
dataset's images, with a thumbnail each, computed by Ray Data actors into the `image_index` store.

The store version is `idx-` + a hash of the model's image side (vision tower and projection
weights, image transform) and of the thumbnail size: every dataset embedded by one model shares
the version, so a refresh that adds images to the manifest costs only the new images (rows are
keyed by image_id; images already there are not computed again), and a retrained model gets a
new version. The lineage of each commit names the manifest version and model it came from.
Images that can no longer be read go to the rejects store, as in train-clip.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from pipeline.config import pool_bounds
from pipeline.lineage import Lineage, StoreInput
from pipeline.records import label
from pipeline.stages.image_rows import commit_image_rows, new_images, stored_ids
from pipeline.stages.runtime import actor_pool
from pipeline.store import Store, embedding_matrix
from pipeline.versioning import code_version, stable_hash, weights_digest

INDEX_VERSION_PREFIX = "idx-"


@dataclass
class IndexResult:
    version: str = label("index version")
    dataset: str = label("dataset")
    model: str = label("model")
    dim: int = 0
    images: int = label("images in the dataset", default=0)
    written: int = label("embedded now", default=0)
    skipped: int = label("already indexed", default=0)
    rejected: dict[str, int] = field(default_factory=dict)  # reason -> images


@ray.remote(num_cpus=0.25)
def _probe_model(ref: str, thumbnail_size: int) -> tuple[str, int]:
    """(index version, embedding dim) of an LLM2CLIP model, read where it can be loaded."""
    from pipeline.clip_model import LLM2CLIP

    model = LLM2CLIP.from_pretrained(ref)
    spec = model.image_spec
    identity = {"vision": weights_digest(model.vision), "size": spec.size, "mean": spec.mean, "std": spec.std, "thumbnail": thumbnail_size}
    return INDEX_VERSION_PREFIX + stable_hash(identity, 16), model.config.embed_dim


class ImageEmbedder:
    """Ray Data actor: image rows (image_id, uri, sha256) -> unit embeddings and thumbnails, plus
    reason/detail for images that cannot be read (their row is not stored)."""

    def __init__(self, ref: str, version: str, max_bytes: int, thumbnail_size: int, device: str):
        from pipeline.clip_model import LLM2CLIP

        self.model = LLM2CLIP.from_pretrained(ref, device=device)
        self.version, self.max_bytes, self.thumbnail_size = version, max_bytes, thumbnail_size

    def __call__(self, batch: pa.Table) -> pa.Table:
        from pipeline.clip_data import load_image
        from pipeline.serve_requests import thumbnail_jpeg

        rows = batch.to_pydict()
        n, dim = batch.num_rows, self.model.config.embed_dim
        embeddings = np.zeros((n, dim), dtype=np.float32)
        thumbnails, reasons, details, images, ok = [b""] * n, [""] * n, [""] * n, [], []
        for i in range(n):
            image, reasons[i], details[i] = load_image(rows["uri"][i], rows["sha256"][i], self.max_bytes)
            if image is not None:
                images.append(image)
                ok.append(i)
                thumbnails[i] = thumbnail_jpeg(image, self.thumbnail_size)
        if images:
            embeddings[ok] = self.model.encode_image(images).numpy()
        return pa.table({
            "image_id": rows["image_id"], "sha256": rows["sha256"], "index_version": [self.version] * n,
            "dim": pa.array([dim] * n, type=pa.int32()),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(embeddings.reshape(-1), type=pa.float32()), dim),
            "thumbnail": pa.array(thumbnails, pa.binary()), "reason": reasons, "detail": details,
        })


def index_identity(ref: str, thumbnail_size: int) -> tuple[str, int]:
    """(index version, dim) of a model, from a small task where it can be loaded."""
    return ray.get(_probe_model.remote(ref, thumbnail_size))


def dataset_images(store_uri: str, dataset: str, split: str | None) -> pa.Table:
    """(image_id, uri, sha256) of a manifest version's images, of one split or all, in manifest order."""
    manifest = Store(store_uri, "manifest")
    if not manifest.commits(dataset):
        raise ValueError(f"serve.dataset: manifest {dataset!r} is not in {store_uri} (ingest it first)")
    rows = manifest.read(dataset, columns=["image_id", "uri", "sha256", "split"])
    if split is not None:
        rows = rows.filter(pc.equal(rows.column("split"), split))
    return rows.select(["image_id", "uri", "sha256"])


def build_index(store_uri: str, ref: str, dataset: str, split: str | None, max_bytes: int, thumbnail_size: int,
                actors: int | tuple[int, int], batch_size: int, cpus: float = 1.0, gpus: float = 0.0,
                run_id: str | None = None) -> IndexResult:
    """Embed the dataset's images the index version lacks (Ray Data actors), commit them with
    their lineage, and return the counts (images = written + skipped + rejected)."""
    version, dim = index_identity(ref, thumbnail_size)
    result = IndexResult(version, dataset, ref, dim)
    index = Store(store_uri, "image_index")
    images = dataset_images(store_uri, dataset, split)
    result.images = images.num_rows
    existing = stored_ids(index, version)
    todo = new_images(images, existing) if len(existing) else images
    result.skipped = result.images - todo.num_rows
    if not todo.num_rows:
        return result
    # Blocks made here (from_items starts no task) and every task at the actors' CPUs: beside a
    # running service (re-indexing after a refresh) a small cluster may have less than a whole CPU
    # free, which Ray Data's default helper tasks (reads, metadata) would wait for forever.
    blocks = max(pool_bounds(actors)[1], -(-todo.num_rows // batch_size))
    computed = ray.data.from_items(todo.to_pylist(), override_num_blocks=blocks).map_batches(
        ImageEmbedder, fn_constructor_kwargs=dict(ref=ref, version=version, max_bytes=max_bytes, thumbnail_size=thumbnail_size,
                                                  device="cuda" if gpus > 0 else "cpu"),
        batch_size=batch_size, batch_format="pyarrow", compute=actor_pool(actors), num_cpus=cpus, num_gpus=gpus).materialize()
    manifest = Store(store_uri, "manifest")
    lineage = Lineage(stage="index", inputs=[StoreInput("manifest", dataset, [c.commit_id for c in manifest.commits(dataset)])],
                      model=ref, model_fingerprint=version, dim=dim, code=code_version(), mlflow_run_id=run_id,
                      config={"split": split, "thumbnail_size": thumbnail_size})
    committed = commit_image_rows(index, version, lineage, computed, result.images, result.skipped, cpus=cpus)
    result.written, result.rejected = committed.written, committed.rejected
    return result


@dataclass(frozen=True)
class LoadedIndex:
    """What a search replica holds: the dataset's indexed images in manifest order."""

    image_ids: list[str]
    vectors: np.ndarray  # float32 (n, dim) unit rows
    thumbnails: list[bytes]


def load_index(store_uri: str, version: str, image_ids: list[str]) -> LoadedIndex:
    """The rows of `version` for `image_ids`, in their order (ids not indexed are left out)."""
    rows = Store(store_uri, "image_index").read(version, columns=["image_id", "embedding", "thumbnail"])
    position = {image_id: i for i, image_id in enumerate(rows.column("image_id").to_pylist())}
    keep = [position[i] for i in image_ids if i in position]
    rows = rows.take(pa.array(keep, pa.int64()))
    return LoadedIndex(rows.column("image_id").to_pylist(), embedding_matrix(rows.column("embedding")),
                       rows.column("thumbnail").to_pylist())
