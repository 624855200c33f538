"""The embedded default dataset: synthetic scenes plus a few real photos, as a listing.

`write_embedded_dataset` renders everything to PNG files and writes `listing.jsonl` in
the same format users bring (image path, short captions, dense captions, metadata), so
the embedded default goes through exactly the same `jobs.ingest` path as user data.
Deterministic for a given config; an existing, complete dataset folder is reused.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from pipeline.config import EmbeddedDatasetConfig
from pipeline.samples import load_photo, sample_photos
from pipeline.scenes import caption_set, generate_scenes, render
from pipeline.versioning import stable_hash

LISTING_NAME = "listing.jsonl"


def dataset_dir(root: str | Path, cfg: EmbeddedDatasetConfig) -> Path:
    """Folder of the embedded dataset for this config (one folder per config)."""
    return Path(root) / f"embedded-{stable_hash(cfg.model_dump(mode='json'), 10)}"


def write_embedded_dataset(root: str | Path, cfg: EmbeddedDatasetConfig) -> Path:
    """Render the dataset under `root` (once) and return the path of its listing."""
    out = dataset_dir(root, cfg)
    listing = out / LISTING_NAME
    if listing.is_file():
        return listing
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    rows = []
    for scene in generate_scenes(cfg.num_scenes, seed=cfg.seed, image_size=cfg.image_size, max_objects=cfg.max_objects):
        name = f"images/{scene.scene_id}.png"
        render(scene).save(tmp / name, optimize=False)
        short, dense = caption_set(scene, cfg.paraphrases, cfg.seed)
        rows.append(
            {
                "image": name,
                "captions": short,
                "dense_captions": [dense],
                "metadata": json.dumps({"kind": "synthetic_scene", "scene": scene.to_dict()}, sort_keys=True),
            }
        )
    if cfg.samples:
        for photo in sample_photos():
            name = f"images/photo-{photo.name}.png"
            load_photo(photo.name).save(tmp / name)
            rows.append(
                {
                    "image": name,
                    "captions": list(photo.captions),
                    "dense_captions": [photo.dense_caption],
                    "metadata": json.dumps({"kind": "sample_photo", "name": photo.name, "source": "scikit-image"}),
                }
            )
    with open(tmp / LISTING_NAME, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    (tmp / "config.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return listing
