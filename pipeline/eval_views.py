"""What `evaluate` measures, read from the stores (no Ray): views of the evaluation sets.

A view is one set as a task sees it: retrieval (images and their distinct caption strings,
with which text describes which image), zero-shot (images, labels, class names) or CRA
(caption pairs). A set already in the stores gives short and long retrieval views and CRA
pairs of its split; a set in a standard format is first ingested through its adapter's
listing (by the evaluate stage) and then read here like any manifest. Every image that is
left out is a `Problem` with its reason.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.captions import ORIGINAL_VERSION, PROVIDED_VERSION
from pipeline.config import EvalSet
from pipeline.cra_sets import dataset_pairs, named_pairs
from pipeline.eval_report import Problem
from pipeline.images import image_id_for, read_uri
from pipeline.store import Store
from pipeline.uri import is_file, read_text

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TEMPLATES = REPO / "configs" / "zeroshot_templates.txt"
ZERO_SHOT_KINDS = ("folder", "fashion_mnist")
SHORT_PROTOCOL = ("image->text: a hit at K when any of the image's captions is among its top K texts; text->image: a hit "
                  "when an image it describes is among its top K images (CLIP_benchmark)")
LONG_PROTOCOL = "one long caption per image (its first), matched by index; R@K both ways"


@dataclass
class RetrievalView:
    name: str
    image_ids: list[str]
    texts: list[str]  # distinct caption strings
    positives: np.ndarray  # (images, texts): text j describes image i
    protocol: str


@dataclass
class ZeroShotView:
    name: str
    image_ids: list[str]
    labels: list[int]
    class_names: list[str]


@dataclass
class CraView:
    name: str
    pairs: list[tuple[str, str]]
    source: str


@dataclass
class Views:
    retrieval: list[RetrievalView] = field(default_factory=list)
    zero_shot: list[ZeroShotView] = field(default_factory=list)
    cra: list[CraView] = field(default_factory=list)
    images: dict[str, tuple[str, str]] = field(default_factory=dict)  # image_id -> (uri, sha256)
    problems: list[Problem] = field(default_factory=list)


def retrieval_view(name: str, image_ids: list[str], captions: dict[str, list[str]], protocol: str) -> RetrievalView | None:
    """Texts deduplicated by exact string; a text's positives are all images it describes."""
    image_ids = [i for i in image_ids if captions.get(i)]
    texts = list(dict.fromkeys(t for i in image_ids for t in captions[i]))
    if len(image_ids) < 2 or not texts:
        return None
    col = {t: j for j, t in enumerate(texts)}
    positives = np.zeros((len(image_ids), len(texts)), dtype=bool)
    for r, i in enumerate(image_ids):
        positives[r, [col[t] for t in captions[i]]] = True
    total = sum(len(captions[i]) for i in image_ids)
    line = (f"{len(image_ids)} images, {len(texts)} distinct captions ({total} before deduplication); {protocol}; "
            "cosine similarity, ties broken by order")
    return RetrievalView(name, image_ids, texts, positives, line)


def captions_of(store_uri: str, version: str, image_ids: set[str]) -> dict[str, list[str]]:
    """image_id -> its distinct non-empty captions in `version`, in write order."""
    captions = Store(store_uri, "captions")
    if not captions.commits(version):
        return {}
    rows = captions.read(version, columns=["image_id", "text"])
    out: dict[str, list[str]] = {}
    for image_id, text in zip(rows.column("image_id").to_pylist(), rows.column("text").to_pylist()):
        if image_id in image_ids and text and text.strip() and text not in out.setdefault(image_id, []):
            out[image_id].append(text)
    return out


def cra_views(entries: list[str], views: Views) -> None:
    """The configured CRA sets: built-in names or pairs files."""
    for entry in entries:
        try:
            name, pairs = named_pairs(entry)
        except ValueError as e:
            views.problems.append(Problem(entry, entry, "unreadable_set", str(e)))
            continue
        views.cra.append(CraView(name, pairs, "built-in set (pipeline.cra_sets)" if name == entry else f"pairs file {entry}"))


def dataset_views(store_uri: str, spec: EvalSet, dataset: str, views: Views) -> None:
    """A manifest already in the stores: short and long retrieval and CRA pairs of its split."""
    manifest_store = Store(store_uri, "manifest")
    if not manifest_store.commits(dataset):
        views.problems.append(Problem(spec.name, dataset, "no_dataset", f"manifest {dataset!r} not in {store_uri}"))
        return
    manifest = manifest_store.read(dataset)
    rows = [r for r in manifest.select(["image_id", "uri", "sha256", "split"]).to_pylist() if r["split"] == spec.split]
    rows = rows[: spec.limit] if spec.limit else rows
    ids = [r["image_id"] for r in rows]
    views.images.update({r["image_id"]: (r["uri"], r["sha256"]) for r in rows})
    short = captions_of(store_uri, ORIGINAL_VERSION, set(ids))
    long = {i: c[:1] for i, c in captions_of(store_uri, PROVIDED_VERSION, set(ids)).items()}
    for suffix, captions, protocol in (("short", short, SHORT_PROTOCOL), ("long", long, LONG_PROTOCOL)):
        view = retrieval_view(f"{spec.name}.{suffix}", ids, captions, f"{dataset} split {spec.split}; {protocol}")
        if view:
            views.retrieval.append(view)
    caption_store = Store(store_uri, "captions")
    caption_rows = pa.concat_tables([caption_store.read(v) for v in (ORIGINAL_VERSION, PROVIDED_VERSION) if caption_store.commits(v)])
    kept = manifest.filter(pc.is_in(manifest.column("image_id"), pa.array(ids)))
    for protocol, pairs in dataset_pairs(kept, caption_rows, spec.split).items():
        views.cra.append(CraView(f"{spec.name}.{protocol}", pairs, f"{dataset} split {spec.split}, {protocol} caption pairs"))


def listed_views(store_uri: str, spec: EvalSet, dataset: str, listed: list[str], class_names: list[str] | None, views: Views) -> None:
    """A set's adapter listing after it was ingested into manifest `dataset`: its rejects as
    problems, its images (in listing order) as a zero-shot or retrieval view."""
    wanted = set(listed)
    rejects = Store(store_uri, "rejects")
    if rejects.commits(f"ingest.{dataset}"):
        for r in rejects.read(f"ingest.{dataset}").to_pylist():
            if r["record_id"] in wanted:
                views.problems.append(Problem(spec.name, r["record_id"], r["reason"], r["detail"]))
    manifest_store = Store(store_uri, "manifest")
    if not manifest_store.commits(dataset):  # every image was rejected
        return
    rows = listed_rows(manifest_store.read(dataset), listed, {p.item for p in views.problems if p.set == spec.name})
    ids = [r["image_id"] for r in rows]
    views.images.update({r["image_id"]: (r["uri"], r["sha256"]) for r in rows})
    if spec.kind in ZERO_SHOT_KINDS:
        labels = [int(json.loads(r["metadata"] or "{}").get("label", -1)) for r in rows]
        keep = [i for i, label in enumerate(labels) if label >= 0]
        views.zero_shot.append(ZeroShotView(spec.name, [ids[i] for i in keep], [labels[i] for i in keep], list(class_names or [])))
        return
    if spec.kind == "long":
        long = {i: c[:1] for i, c in captions_of(store_uri, PROVIDED_VERSION, set(ids)).items()}
        view = retrieval_view(spec.name, ids, long, f"{spec.kind} file; {LONG_PROTOCOL}")
    else:
        view = retrieval_view(spec.name, ids, captions_of(store_uri, ORIGINAL_VERSION, set(ids)), f"{spec.kind} file; {SHORT_PROTOCOL}")
    if view:
        views.retrieval.append(view)


def listed_rows(manifest: pa.Table, uris: list[str], rejected: set[str]) -> list[dict]:
    """The manifest rows of the listed images, in listing order, each with its listed uri. An image
    ingested before under another path (same bytes, so same image_id) is found by its hash."""
    by_uri = {r["uri"]: r for r in manifest.to_pylist()}
    by_id = {r["image_id"]: r for r in by_uri.values()}
    rows = []
    for uri in uris:
        row = by_uri.get(uri)
        if row is None and uri not in rejected:
            row = by_id.get(image_id_for(hashlib.sha256(read_uri(uri)).hexdigest()))
        if row is not None:
            rows.append(row | {"uri": uri})
    return rows


def read_templates(path: str | Path | None) -> list[str]:
    """Zero-shot prompt templates, one per line with one `{}` for the class name (`#` comments).
    `path` is a local path or a URI."""
    path = str(path or DEFAULT_TEMPLATES)
    try:
        if not is_file(path):
            raise ValueError(f"evaluate.templates: {path} does not exist")
        text = read_text(path)
    except OSError as e:  # LocationError: a missing bucket, a refused request
        raise ValueError(f"evaluate.templates: {e}") from None
    lines = [line.strip() for line in text.splitlines()]
    templates = [t for t in lines if t and not t.startswith("#")]
    bad = [t for t in templates if t.count("{}") != 1]
    if not templates or bad:
        raise ValueError(f"evaluate.templates: {path}: need lines with exactly one {{}} (the class name); bad: {bad[:3]}")
    return templates
