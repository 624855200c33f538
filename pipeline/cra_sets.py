"""Caption-pair sets for CRA (no Ray): the three built-in sets, user files of pairs, and the
held-out pairs of an ingested dataset. finetune-text and evaluate both take their sets here.

Built-in sets (generated, deterministic, no download):
* `everyday-pairs`: hand-written pairs of everyday photo captions (`pipeline.everyday_pairs`);
* `long-captions`: long descriptions in families that share structure and most details, so
  only the details tell partners apart (`pipeline.long_captions`);
* `scenes`: the short alt-text vs the dense caption of synthetic scenes drawn with a seed the
  embedded dataset does not use, so no scene was trained on.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from pipeline import uri
from pipeline.caption_pairs import PROTOCOLS, caption_pairs

BUILTIN_SETS = ("everyday-pairs", "long-captions", "scenes")
SCENES_SEED = 1000  # the embedded dataset uses seed 0 by default
SCENES_COUNT = 100

Pairs = list[tuple[str, str]]


def builtin_pairs(name: str) -> Pairs:
    if name == "everyday-pairs":
        from pipeline.everyday_pairs import everyday_pairs

        return everyday_pairs()
    if name == "long-captions":
        from pipeline.long_captions import long_caption_pairs

        return [(p.first, p.second) for p in long_caption_pairs()]
    if name == "scenes":
        from pipeline.scenes import caption_set, generate_scenes

        pairs = []
        for scene in generate_scenes(SCENES_COUNT, seed=SCENES_SEED):
            shorts, dense = caption_set(scene, 0, SCENES_SEED)
            pairs.append((shorts[0], dense))
        return pairs
    raise ValueError(f"unknown built-in CRA set {name!r}; use one of {list(BUILTIN_SETS)} or a file of pairs")


def file_pairs(path: str | Path) -> Pairs:
    """Pairs from a .jsonl/.json, .csv or .parquet file (a local path or a URI) with columns `first`
    and `second`. A file that cannot be read is a one-line ValueError naming it."""
    from pipeline.eval_sets import read_records

    path = str(path)
    try:
        records = read_records(path)
    except OSError as e:  # uri.LocationError: a missing file or bucket, a refused request
        raise ValueError(f"CRA set: {e}") from None
    missing = [c for c in ("first", "second") if not any(c in r for r in records)]
    if missing:
        raise ValueError(f"CRA set {path}: missing column(s) {missing} (need `first` and `second`)")
    pairs = [(r["first"], r["second"]) for r in records
             if isinstance(r.get("first"), str) and isinstance(r.get("second"), str) and r["first"].strip() and r["second"].strip()]
    if len(pairs) < 2:
        raise ValueError(f"CRA set {path}: needs at least 2 non-empty pairs, has {len(pairs)}")
    return pairs


def named_pairs(entry: str) -> tuple[str, Pairs]:
    """(set name, pairs) of a config entry: a built-in name or a file path or URI (named by its stem)."""
    if entry in BUILTIN_SETS:
        return entry, builtin_pairs(entry)
    return Path(uri.name(entry)).stem, file_pairs(entry)  # the file name only: never a Path of a URI


def dataset_pairs(manifest: pa.Table, captions: pa.Table, split: str | None) -> dict[str, Pairs]:
    """{protocol: text pairs} of a dataset's split (see `pipeline.caption_pairs`); protocols
    with fewer than two pairs are left out. `captions` holds caption-store rows."""
    text = dict(zip(captions.column("caption_id").to_pylist(), captions.column("text").to_pylist()))
    out = {}
    for protocol in PROTOCOLS:
        pairs = [(text[a], text[b]) for a, b in caption_pairs(manifest, captions, split, protocol)]
        if len(pairs) >= 2:
            out[protocol] = pairs
    return out
