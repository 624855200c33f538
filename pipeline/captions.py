"""Caption-store rows: every caption a stage writes, with an id that names its content."""

from __future__ import annotations

from datetime import datetime

from pipeline.versioning import stable_hash

ORIGINAL_VERSION = "original"  # caption_version of a listing's short captions (ingest)
PROVIDED_VERSION = "provided"  # caption_version of dense captions given in a listing (ingest)


def caption_rows(image_id: str, texts: list[str], caption_version: str, source: str, now: datetime, model: str = "",
                 prompt_id: str = "", first_index: int = 0) -> list[dict]:
    """Caption-store rows; the caption_id hashes (image, version, source, position, text)."""
    return [
        {
            "caption_id": stable_hash([image_id, caption_version, source, i, text], 16),
            "image_id": image_id,
            "text": text,
            "source": source,
            "caption_version": caption_version,
            "model": model,
            "prompt_id": prompt_id,
            "created_at": now,
        }
        for i, text in enumerate(texts, start=first_index)
    ]
