"""Train / val / test splits derived from ids, so an item keeps its split on every run."""

from __future__ import annotations

from pipeline.versioning import stable_hash

DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)


def assign_split(image_id: str, fractions: tuple[float, float, float]) -> str:
    """The split of an image id (hex): its first 8 digits as a fraction of the range."""
    u = int(image_id[:8], 16) / 0x100000000
    if u < fractions[0]:
        return "train"
    return "val" if u < fractions[0] + fractions[1] else "test"


def split_of(manifest_split: dict[str, str], item: str) -> str:
    """An item's manifest split; a corpus item (no image, so no manifest row) gets one from a
    hash of its id."""
    return manifest_split.get(item) or assign_split(stable_hash(item, 16), DEFAULT_FRACTIONS)
