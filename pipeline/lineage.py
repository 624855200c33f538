"""Lineage: what produced a store commit, recorded with it (`store.Commit.lineage`).

One record type for every store: the stage, what it read (`inputs`), its config section as
run, the code version and the MLflow run, and the facts of its kind (a caption version's
model and prompt, an embedding version's encoder, a feature version's tower). A field a
stage has nothing for stays None and is not written, so a commit record holds only what
applies to it; records written before these types existed read back unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline import records


@dataclass(frozen=True)
class StoreInput:
    """A store version a stage read, and (when it matters) the commits it saw."""

    store: str
    version: str
    commits: list[str] | None = None


@dataclass(frozen=True)
class ListingInput:
    """A listing file a stage read; its sha256 tells a re-run that it was ingested already."""

    kind: str
    uri: str
    sha256: str | None = None


@dataclass(frozen=True)
class Lineage:
    stage: str = ""  # "": rows written without lineage (a hand-made store, a test)
    inputs: list[StoreInput | ListingInput] = field(default_factory=list)
    config: dict[str, Any] | None = None  # the stage's config section, as run
    code: dict[str, Any] | None = None  # `versioning.code_version()`
    mlflow_run_id: str | None = None
    counts: dict[str, int] | None = None  # what the writer counted when it committed
    dim: int | None = None  # vector stores: the width of every row's vector
    # recaption: the caption version and what makes it
    caption_version: str | None = None
    mode: str | None = None
    model: str | None = None
    model_fingerprint: str | None = None
    prompt_id: str | None = None
    # embed: the encoder (as configured, where it was loaded from, its options and version)
    encoder: str | None = None
    encoder_path: str | None = None
    encoder_options: dict[str, Any] | None = None
    encoder_version: str | None = None
    # corpus seeds
    corpus: str | None = None
    seed: int | None = None
    # train-clip rejects
    run_name: str | None = None
    # features: the frozen tower and its image transform
    vision: str | None = None
    feature_version: str | None = None
    image_size: int | None = None
    image_mean: list[float] | None = None
    image_std: list[float] | None = None

    def to_json(self) -> dict[str, Any]:
        return _written(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Lineage:
        return records.from_json(cls, data)


@dataclass(frozen=True)
class ModelLineage:
    """What made a saved model (`llm2clip_lineage.json` beside its weights): the training run,
    its recipe and code, and the inputs it trained on."""

    stage: str
    run_name: str
    steps: int
    config: dict[str, Any]  # the stage's config section, as run
    code: dict[str, Any]
    mlflow_run_id: str | None = None
    # finetune-text
    base_model: str | None = None
    train_pairs: int | None = None
    # train-clip
    manifest: str | None = None
    embeddings: str | None = None
    encoder_version: str | None = None
    caption_versions: dict[str, str] | None = None
    vision_model: str | None = None
    samples_digest: str | None = None

    def to_json(self) -> dict[str, Any]:
        return _written(self)


def _written(record: Lineage | ModelLineage) -> dict[str, Any]:
    """What a lineage record writes: the fields that apply to it (None stays out)."""
    return {k: v for k, v in records.to_json(record).items() if v is not None}
