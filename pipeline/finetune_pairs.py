"""Stage 1's data (no Ray): the caption pairs `finetune_text` trains on, in a seeded order, and
the held-out CRA sets it is measured on.

Pairs come from `finetune_text.pairs`: two caption versions of the same images (short vs
dense), one version against itself with its sentences reordered, or a built corpus (short vs
dense, short vs paraphrase). Items of `finetune_text.eval_split` never reach a training pair:
they are the held-out CRA sets. A pair's id is its position in the seeded order, which is what
a checkpoint's data position records.
"""

from __future__ import annotations

import random
import re
from typing import NamedTuple

import pyarrow as pa

from pipeline.caption_pairs import version_pairs
from pipeline.captions import ORIGINAL_VERSION, PROVIDED_VERSION
from pipeline.config import PipelineConfig
from pipeline.corpus_record import corpus_versions
from pipeline.cra_sets import builtin_pairs, dataset_pairs
from pipeline.splits import split_of
from pipeline.store import Store

SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


class PairSpec(NamedTuple):
    name: str
    first: str  # caption version
    second: str
    reorder: bool = False  # second = first with its sentences in another order
    repeat: int = 1
    corpus: bool = False  # text-only items (no images, so no manifest)


def pair_versions(cfg: PipelineConfig) -> list[PairSpec]:
    """The caption versions behind every configured pair source."""
    out = []
    for source in cfg.finetune_text.pairs:
        if source.corpus:
            versions = corpus_versions(cfg.store.uri, source.corpus)
            out += [PairSpec(f"{source.corpus}.short-vs-{role}", versions.short, getattr(versions, role), repeat=source.repeat, corpus=True)
                    for role in ("dense", "paraphrase")]
        elif source.reorder_sentences:
            out.append(PairSpec(f"{source.first}-vs-reordered", source.first, source.first, reorder=True, repeat=source.repeat))
        else:
            out.append(PairSpec(f"{source.first}-vs-{source.second}", source.first, source.second, repeat=source.repeat))
    return out


def reordered_pairs(table: pa.Table, seed: int) -> list[tuple[str, str, str]]:
    """(item, caption, the caption's sentences in another order) for each item's first
    caption of at least two sentences; the order depends only on (seed, text)."""
    pairs, seen = [], set()
    for item, text in zip(table.column("image_id").to_pylist(), table.column("text").to_pylist()):
        sentences = [s for s in SENTENCE_END.split(text.strip()) if s]
        if item in seen or len(sentences) < 2:
            continue
        seen.add(item)
        order = list(range(len(sentences)))
        rng = random.Random(f"{seed}/{text}")
        while order == sorted(order):
            rng.shuffle(order)
        pairs.append((item, text, " ".join(sentences[i] for i in order)))
    return pairs


def training_pairs(cfg: PipelineConfig) -> tuple[pa.Table, dict[str, list[tuple[str, str]]]]:
    """The training pairs (pair_id, first, second, item[, negative]) in a seeded shuffled order, and
    the held-out CRA sets {name: pairs}."""
    ft = cfg.finetune_text
    captions = Store(cfg.store.uri, "captions")
    manifest_store = Store(cfg.store.uri, "manifest")
    dataset = ft.dataset or cfg.ingest.dataset
    manifest = manifest_store.read(dataset) if manifest_store.commits(dataset) else None
    split = dict(zip(manifest.column("image_id").to_pylist(), manifest.column("split").to_pylist())) if manifest is not None else {}
    rng = random.Random(ft.seed)
    train: list[tuple[str, str, str]] = []
    held_out: dict[str, list[tuple[str, str]]] = {}
    for name, first, second, reorder, repeat, corpus in pair_versions(cfg):
        missing = [v for v in (first, second) if not captions.commits(v)]
        if missing:
            raise ValueError(f"finetune_text.pairs: caption versions {missing} do not exist; have {captions.versions()}")
        if reorder:
            pairs = reordered_pairs(captions.read(first), ft.seed)
        else:
            pairs = version_pairs(captions.read(first), captions.read(second), first == second)
        if not corpus and manifest is not None:
            # a caption version holds every dataset's captions: train on this dataset's images only
            pairs = [p for p in pairs if p[0] in split]
        held_out[name] = [(a, b) for item, a, b in pairs if split_of(split, item) == ft.eval_split]
        for _ in range(repeat):
            for item, a, b in pairs:
                if split_of(split, item) != ft.eval_split:
                    train.append((item, *((a, b) if rng.random() < 0.5 else (b, a))))  # random direction
    if not train:
        raise ValueError("finetune_text: no training pairs (check finetune_text.pairs and the caption store)")
    rng.shuffle(train)
    # pair_id: the position in this seeded order; checkpoints record which ids an epoch has trained
    columns = {"pair_id": list(range(len(train))), "first": [t[1] for t in train], "second": [t[2] for t in train],
               "item": [t[0] for t in train]}  # the image or corpus item: what a held-out check reads
    if ft.hard_negatives:
        columns["negative"] = hard_negatives(train)
    return pa.table(columns), held_out


def hard_negatives(train: list[tuple[str, str, str]]) -> list[str]:
    """For each (item, first, second): the second caption of the next pair of another item
    (one item may stand in several pairs, with repeats even side by side)."""
    out = []
    for i, (item, _, _) in enumerate(train):
        j = next((k % len(train) for k in range(i + 1, i + len(train)) if train[k % len(train)][0] != item), None)
        if j is None:
            raise ValueError("finetune_text.hard_negatives needs pairs of at least two items")
        out.append(train[j][2])
    return out


def cra_sets_for(cfg: PipelineConfig, held_out: dict[str, list[tuple[str, str]]]) -> dict[str, list[tuple[str, str]]]:
    """Named CRA sets of text pairs: the held-out training pairs, the scene protocols when the
    manifest has originals and dense captions, and the built-in sets of `builtin_eval`."""
    ft = cfg.finetune_text
    sets = {f"heldout.{k}": v for k, v in held_out.items() if len(v) >= 2}
    dataset = ft.dataset or cfg.ingest.dataset
    manifest_store, captions = Store(cfg.store.uri, "manifest"), Store(cfg.store.uri, "captions")
    if manifest_store.commits(dataset):
        rows = pa.concat_tables([captions.read(v) for v in captions.versions() if v in (ORIGINAL_VERSION, PROVIDED_VERSION)])
        sets |= {f"scenes.{protocol}": pairs for protocol, pairs in dataset_pairs(manifest_store.read(dataset), rows, ft.eval_split).items()}
    if ft.eval_pairs is not None:
        sets = {name: pairs[:ft.eval_pairs] for name, pairs in sets.items()}
    for name in ft.builtin_eval:
        sets[name] = builtin_pairs(name)
    return sets
