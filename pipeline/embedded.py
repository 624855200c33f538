"""The embedded default dataset: synthetic scenes plus a few real photos, as a listing.

`write_embedded_dataset` renders everything to PNG files and writes `listing.jsonl` in
the same format users bring (image path relative to the listing, short captions, dense
captions, metadata), so the embedded default goes through exactly the same `jobs.ingest`
path as user data. It goes to storage that every node reaches (`cfg.storage`: a local folder
on one machine, or a URI): rendered into node-local scratch, then uploaded, the listing last,
so a listing that exists marks a complete dataset, which is reused. Deterministic for a given
config.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from pipeline import uri
from pipeline.config import EmbeddedDatasetConfig
from pipeline.samples import load_photo, sample_photos
from pipeline.scenes import caption_set, generate_scenes, render
from pipeline.versioning import stable_hash

LISTING_NAME = "listing.jsonl"


def dataset_dir(root: str | os.PathLike, cfg: EmbeddedDatasetConfig) -> str:
    """Location (folder or prefix) of the embedded dataset for this config under `root`."""
    return uri.join(uri.absolute(root), f"embedded-{stable_hash(cfg.model_dump(mode='json'), 10)}")


def write_embedded_dataset(root: str | os.PathLike, cfg: EmbeddedDatasetConfig, scratch: str | os.PathLike | None = None) -> str:
    """Render the dataset under `root` (a local folder or a URI; once) and return its listing's
    location. `scratch`: the node-local folder it is rendered in when `root` is a URI."""
    out = dataset_dir(root, cfg)
    listing = uri.join(out, LISTING_NAME)
    if uri.exists(listing):
        return listing
    if uri.is_local(out):
        local_out = Path(uri.local_path(out))
        tmp = local_out.with_name(local_out.name + ".tmp")
        _render(tmp, cfg)
        shutil.rmtree(local_out, ignore_errors=True)
        tmp.rename(local_out)
        return str(local_out / LISTING_NAME)
    if scratch is not None:
        os.makedirs(scratch, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{uri.name(out)}-", dir=None if scratch is None else str(scratch)))
    try:
        _render(tmp, cfg)
        try:
            uri.upload_dir(tmp / "images", uri.join(out, "images"))
            uri.write_bytes(uri.join(out, "config.json"), (tmp / "config.json").read_bytes())
            uri.write_bytes(listing, (tmp / LISTING_NAME).read_bytes())  # last: it marks the dataset complete
        except OSError as e:
            raise uri.LocationError(f"embedded dataset {out}: {' '.join(str(e).split())[:300]}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return listing


def _render(tmp: Path, cfg: EmbeddedDatasetConfig) -> None:
    """The dataset's files in local folder `tmp` (made anew)."""
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
