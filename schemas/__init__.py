"""Arrow schemas of every store. The store library validates reads and writes against these.

Each store is a versioned Parquet dataset (see `pipeline.store`). Columns are documented
with field metadata so `pyarrow` readers and the MLflow artifacts carry the meaning too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa


def _field(name: str, type_: pa.DataType, doc: str, nullable: bool = False) -> pa.Field:
    return pa.field(name, type_, nullable=nullable, metadata={"doc": doc})


IMAGE_MANIFEST = pa.schema(
    [
        _field("image_id", pa.string(), "stable id: first 16 hex chars of the image bytes' sha256"),
        _field("uri", pa.string(), "where the image bytes live: local path or pyarrow filesystem URI"),
        _field("sha256", pa.string(), "sha256 of the image bytes"),
        _field("width", pa.int32(), "decoded width in pixels"),
        _field("height", pa.int32(), "decoded height in pixels"),
        _field("mode", pa.string(), "PIL mode of the stored image (RGB, L, RGBA, ...)"),
        _field("split", pa.string(), "train, val or test"),
        _field("captions", pa.list_(pa.string()), "original (short, alt-text style) captions"),
        _field("metadata", pa.string(), "free-form JSON, e.g. a synthetic scene's ground truth", True),
        _field("ingested_at", pa.timestamp("us", tz="UTC"), "when the row was added"),
    ]
)

CAPTIONS = pa.schema(
    [
        _field("caption_id", pa.string(), "stable id: hash of (image_id, caption_version, source, index, text)"),
        _field("image_id", pa.string(), "joins the image manifest"),
        _field("text", pa.string(), "the caption"),
        _field("source", pa.string(), "original | dense | paraphrase"),
        _field("caption_version", pa.string(), "'original', 'provided' or the hash of the recaption config"),
        _field("model", pa.string(), "model that wrote it ('' for human/alt-text captions)"),
        _field("prompt_id", pa.string(), "id of the prompt template ('' when none)"),
        _field("created_at", pa.timestamp("us", tz="UTC"), "when the row was written"),
    ]
)


def embeddings_schema(dim: int | None = None, value_type: pa.DataType = pa.float16()) -> pa.Schema:
    """The embedding store's schema; `dim` fixes the size of the embedding list, `value_type` its
    elements: float16 for new versions (half the bytes), float32 in versions written before."""
    list_type = pa.list_(value_type, dim) if dim else pa.list_(value_type)
    return pa.schema(
        [
            _field("caption_id", pa.string(), "joins the caption store"),
            _field("image_id", pa.string(), "joins the image manifest"),
            _field("text_sha256", pa.string(), "sha256 of the encoded text (skip key with encoder_version)"),
            _field("encoder_version", pa.string(), "identifies weights + pooling + attention mode"),
            _field("dim", pa.int32(), "embedding dimension"),
            _field("embedding", list_type, "caption embedding, fixed-size list of float16 (float32 in older versions); "
                   "readers compute in float32"),
        ]
    )


EMBEDDINGS = embeddings_schema()


def features_schema(dim: int | None = None, value_type: pa.DataType = pa.float32()) -> pa.Schema:
    """The feature store's schema: a frozen vision tower's pooled image features (cheap sweeps)."""
    list_type = pa.list_(value_type, dim) if dim else pa.list_(value_type)
    return pa.schema(
        [
            _field("image_id", pa.string(), "joins the image manifest"),
            _field("sha256", pa.string(), "sha256 of the image bytes the feature was computed from"),
            _field("feature_version", pa.string(), "identifies the tower's weights + the image transform"),
            _field("dim", pa.int32(), "feature dimension"),
            _field("feature", list_type, "float32 pooled feature of the centre-cropped image, fixed-size list"),
        ]
    )


FEATURES = features_schema()


def image_index_schema(dim: int | None = None, value_type: pa.DataType = pa.float32()) -> pa.Schema:
    """The image index's schema: a trained LLM2CLIP model's unit image embeddings (what
    `jobs.serve` searches), with a small thumbnail of each image for the result grid."""
    list_type = pa.list_(value_type, dim) if dim else pa.list_(value_type)
    return pa.schema(
        [
            _field("image_id", pa.string(), "joins the image manifest"),
            _field("sha256", pa.string(), "sha256 of the image bytes the embedding was computed from"),
            _field("index_version", pa.string(), "identifies the model's weights (vision tower, projection, image transform)"),
            _field("dim", pa.int32(), "embedding dimension"),
            _field("embedding", list_type, "float32 unit image embedding in the model's joint space, fixed-size list"),
            _field("thumbnail", pa.binary(), "JPEG thumbnail (longest side serve.thumbnail_size) for the result grid"),
        ]
    )


IMAGE_INDEX = image_index_schema()


@dataclass(frozen=True)
class VectorColumn:
    """The vector column of a store holding one fixed-size float vector per row. One version
    holds one element type: the first of `value_types` for a new version, any of them when read."""

    column: str
    schema: Callable[[int | None, pa.DataType], pa.Schema]  # (dim, element type) -> the store's schema
    value_types: tuple[pa.DataType, ...]

    def schema_of(self, dim: int | None, value_type: pa.DataType | None = None) -> pa.Schema:
        return self.schema(dim, value_type or self.value_types[0])


#: stores holding one fixed-size float vector per row
VECTOR_STORES = {
    # float16 halves the store; versions written as float32 before stay readable (and appendable)
    "embeddings": VectorColumn("embedding", embeddings_schema, (pa.float16(), pa.float32())),
    "features": VectorColumn("feature", features_schema, (pa.float32(),)),
    "image_index": VectorColumn("embedding", image_index_schema, (pa.float32(),)),
}

REJECTS = pa.schema(
    [
        _field("stage", pa.string(), "stage that rejected the record (ingest, recaption, embed, ...)"),
        _field("record_id", pa.string(), "id of the rejected record (uri, image_id or caption_id)"),
        _field("reason", pa.string(), "machine-readable reason, e.g. not_an_image, too_large"),
        _field("detail", pa.string(), "human-readable detail"),
        _field("time", pa.timestamp("us", tz="UTC"), "when it was rejected"),
    ]
)

SOURCES = pa.schema(
    [
        _field("uri", pa.string(), "a listed image's location, as the listing resolved it"),
        _field("size", pa.int64(), "its size in bytes when it was checked"),
        _field("mtime_ns", pa.int64(), "its modification time when it was checked (ns since the epoch; S3 gives whole seconds)"),
        _field("checked_with", pa.string(), "'' for an accepted image; for a reject, the hash of the image limits it failed"),
        _field("outcome", pa.string(), "accepted (its image_id is in the manifest version) or rejected"),
        _field("image_id", pa.string(), "the image its bytes are (accepted, duplicate_image)", True),
        _field("reason", pa.string(), "why it was rejected (the rejects store's reason)", True),
        _field("checked_at", pa.timestamp("us", tz="UTC"), "when its bytes were read"),
    ]
)

#: store name -> schema; the embedding store's list size is checked against its `dim` column.
STORE_SCHEMAS: dict[str, pa.Schema] = {
    "manifest": IMAGE_MANIFEST,
    "captions": CAPTIONS,
    "embeddings": EMBEDDINGS,
    "features": FEATURES,
    "image_index": IMAGE_INDEX,
    "rejects": REJECTS,
    "sources": SOURCES,
}

#: store name -> the column that identifies a row (rewrites never duplicate it).
STORE_KEYS: dict[str, tuple[str, ...]] = {
    "manifest": ("image_id",),
    "captions": ("caption_id",),
    "embeddings": ("caption_id",),
    "features": ("image_id",),
    "image_index": ("image_id",),
    "rejects": ("stage", "record_id", "reason"),
    # one row per (location, size, mtime) and limits: a refresh skips listed rows whose identity is here, unopened
    "sources": ("uri", "size", "mtime_ns", "checked_with"),
}
