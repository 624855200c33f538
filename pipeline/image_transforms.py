"""Image preprocessing for the vision tower as pure PIL/numpy functions (no torchvision).

* `random_resized_crop`: torchvision's RandomResizedCrop algorithm (10 tries, then a
  central crop clamped to the aspect-ratio range), bicubic resize; the training transform.
* `resize_center_crop`: shortest side to `size` (bicubic), centre crop; the eval transform.
* `to_pixel_values`: RGB, scaled to [0, 1], normalised with the tower's mean/std, (3, H, W).

`ImageSpec` carries size/mean/std, read from a Hugging Face image processor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.images import to_rgb


@dataclass(frozen=True)
class ImageSpec:
    """What the vision tower expects: square `size` input normalised with mean/std."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_processor(cls, processor_or_dir) -> ImageSpec:
        """From an image processor or a directory holding one (PIL-backed processors).
        The final size is the crop size when the processor centre-crops, else its resize size."""
        processor = processor_or_dir
        if isinstance(processor_or_dir, (str, Path)):
            from transformers import AutoImageProcessor

            processor = AutoImageProcessor.from_pretrained(processor_or_dir)
        crop = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else None
        size_dict = crop or processor.size
        size = size_dict.get("height") or size_dict.get("shortest_edge")
        if not size:
            raise ValueError(f"cannot read an image size from {type(processor).__name__}: size={processor.size}, crop_size={crop}")
        return cls(int(size), tuple(float(v) for v in processor.image_mean), tuple(float(v) for v in processor.image_std))


def random_resized_crop_box(
    width: int,
    height: int,
    scale: tuple[float, float] = (0.9, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    rng: np.random.Generator | None = None,
) -> tuple[int, int, int, int]:
    """(left, top, w, h) of a crop covering `scale` of the area with aspect ratio in `ratio`
    (torchvision's RandomResizedCrop.get_params)."""
    rng = rng if rng is not None else np.random.default_rng()
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    # Fallback: the largest central crop whose aspect ratio is inside `ratio`.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def random_resized_crop(
    img: Image.Image,
    size: int,
    scale: tuple[float, float] = (0.9, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    rng: np.random.Generator | None = None,
) -> Image.Image:
    """Training transform: a random crop (see `random_resized_crop_box`) resized to size x size."""
    left, top, w, h = random_resized_crop_box(img.width, img.height, scale, ratio, rng)
    # crop, then resize (as torchvision): the filter does not see pixels outside the crop
    return img.crop((left, top, left + w, top + h)).resize((size, size), Image.Resampling.BICUBIC)


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Eval transform: shortest side to `size` (bicubic), then the central size x size crop."""
    short, long = sorted((img.width, img.height))
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if img.width <= img.height else (new_long, size)
    img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return img.crop((left, top, left + size, top + size))


def to_pixel_values(img: Image.Image, spec: ImageSpec) -> np.ndarray:
    """float32 (3, size, size) normalised with spec's mean/std. Images not already
    size x size get the eval transform first."""
    img = to_rgb(img)
    if img.size != (spec.size, spec.size):
        img = resize_center_crop(img, spec.size)
    x = np.asarray(img, dtype=np.float32) / 255.0
    x = (x - np.asarray(spec.mean, dtype=np.float32)) / np.asarray(spec.std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))
