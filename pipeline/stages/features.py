"""Frozen image features for cheap sweeps: a vision tower's pooled features of each image,
computed once by Ray Data actors into the feature store.

The store version is `vis-` + a hash of the tower's weights and of the image transform
(size, mean, std), so two paths to the same weights share features and a retrained tower
gets new ones. Images the version already holds are not computed again (keyed by image_id),
and images that can no longer be read go to the rejects store, as in train-clip.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import ray

from pipeline.config import pool_bounds
from pipeline.image_transforms import ImageSpec
from pipeline.lineage import Lineage
from pipeline.records import hidden, label
from pipeline.stages.image_rows import commit_image_rows, new_images, stored_ids
from pipeline.stages.runtime import actor_pool
from pipeline.store import Store
from pipeline.versioning import code_version, stable_hash, weights_digest

FEATURE_VERSION_PREFIX = "vis-"


@dataclass
class FeatureResult:
    version: str = label("feature version")
    dim: int
    spec: ImageSpec = hidden()
    images: int = 0  # images asked for
    written: int = label("computed", default=0)
    skipped: int = label("already stored", default=0)  # already in the version
    rejected: dict[str, int] = field(default_factory=dict)  # reason -> images


def load_tower(ref: str, image_size: int | None = None):
    """(VisionTower, ImageSpec) of a vision backbone (path, hub id, URI), or the trained tower
    of an LLM2CLIP model (a train-clip output: its own image size)."""
    from pathlib import Path

    from pipeline.clip_model import MODEL_CONFIG, LLM2CLIP, VisionTower
    from pipeline.model_refs import local_path

    path = local_path(ref)
    if (Path(path) / MODEL_CONFIG).is_file():
        model = LLM2CLIP.from_pretrained(path)
        return model.vision, model.image_spec
    spec = ImageSpec.from_processor(path)
    return VisionTower.from_pretrained(path, embed_dim=1), ImageSpec(image_size or spec.size, spec.mean, spec.std)


@ray.remote
def _probe_tower(ref: str, image_size: int | None) -> tuple[str, int, ImageSpec]:
    """(feature version, feature dim, image spec) of a vision tower, read where it can be loaded."""
    tower, spec = load_tower(ref, image_size)
    backbone = tower.backbone
    version = FEATURE_VERSION_PREFIX + stable_hash({"weights": weights_digest(backbone), "size": spec.size, "mean": spec.mean, "std": spec.std}, 16)
    return version, int(backbone.config.hidden_size), spec


class TowerFeatures:
    """Ray Data actor: image rows (image_id, uri, sha256) -> feature rows, plus reason/detail
    for images that cannot be read (their feature is zeros and is not stored)."""

    def __init__(self, ref: str, spec: ImageSpec, version: str, max_bytes: int):
        self.tower = load_tower(ref, spec.size)[0].eval()
        self.spec, self.version, self.max_bytes = spec, version, max_bytes

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        from pipeline.clip_data import load_image, normalise_pixels
        from pipeline.image_transforms import resize_center_crop

        rows = batch.to_pydict()
        n, size = batch.num_rows, self.spec.size
        pixels = np.zeros((n, size, size, 3), dtype=np.uint8)
        reasons, details = [""] * n, [""] * n
        for i in range(n):
            image, reasons[i], details[i] = load_image(rows["uri"][i], rows["sha256"][i], self.max_bytes)
            if image is not None:
                pixels[i] = np.asarray(resize_center_crop(image, size), dtype=np.uint8)
        x = normalise_pixels(torch.from_numpy(pixels), self.spec.mean, self.spec.std)
        with torch.inference_mode():  # Ray Data calls from its own threads: no grad mode set elsewhere applies
            features = self.tower.pooled(x).float().numpy()
        dim = features.shape[1]
        return pa.table({
            "image_id": rows["image_id"], "sha256": rows["sha256"], "feature_version": [self.version] * n,
            "dim": pa.array([dim] * n, type=pa.int32()),
            "feature": pa.FixedSizeListArray.from_arrays(pa.array(features.reshape(-1), type=pa.float32()), dim),
            "reason": reasons, "detail": details,
        })


def feature_identity(ref: str, image_size: int | None) -> tuple[str, int, ImageSpec]:
    """(feature version, dim, image spec) of a tower, from a small task where it can be loaded."""
    return ray.get(_probe_tower.remote(ref, image_size))


def compute_features(store_uri: str, ref: str, images, image_size: int | None, max_bytes: int, actors: int, batch_size: int,
                     run_id: str | None = None) -> FeatureResult:
    """Features of `images` (a Ray Dataset of image_id, uri, sha256) by the tower `ref`, added to
    the feature store; returns the version and counts (images = written + skipped + rejected)."""
    version, dim, spec = feature_identity(ref, image_size)
    result = FeatureResult(version, dim, spec)
    features = Store(store_uri, "features")
    images = images.select_columns(["image_id", "uri", "sha256"]).materialize()
    result.images = images.count()
    existing = stored_ids(features, version)
    todo = images.map_batches(new_images, fn_kwargs={"existing": existing}, batch_format="pyarrow") if len(existing) else images
    todo = todo.materialize()
    missing = todo.count()
    result.skipped = result.images - missing
    if not missing:
        return result
    computed = todo.repartition(max(pool_bounds(actors)[1], -(-missing // batch_size))).map_batches(
        TowerFeatures, fn_constructor_kwargs=dict(ref=ref, spec=spec, version=version, max_bytes=max_bytes), batch_size=batch_size,
        batch_format="pyarrow", compute=actor_pool(actors), num_cpus=1).materialize()
    lineage = Lineage(stage="features", vision=ref, feature_version=version, dim=dim, image_size=spec.size, image_mean=list(spec.mean),
                      image_std=list(spec.std), code=code_version(), mlflow_run_id=run_id)
    committed = commit_image_rows(features, version, lineage, computed, result.images, result.skipped)
    result.written, result.rejected = committed.written, committed.rejected
    return result
