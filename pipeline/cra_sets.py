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

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

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
    """Pairs from a .jsonl/.json (one object per line), .csv or .parquet with columns `first` and `second`."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"CRA set {path}: no such file")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        table = pa.Table.from_pylist(rows) if rows else pa.table({})
    elif suffix == ".csv":
        table = pacsv.read_csv(path)
    elif suffix == ".parquet":
        table = pq.read_table(path)
    else:
        raise ValueError(f"CRA set {path}: unknown file type {suffix!r}; use .jsonl, .csv or .parquet")
    missing = [c for c in ("first", "second") if c not in table.column_names]
    if missing:
        raise ValueError(f"CRA set {path}: missing column(s) {missing} (need `first` and `second`)")
    pairs = [(str(a), str(b)) for a, b in zip(table.column("first").to_pylist(), table.column("second").to_pylist())
             if isinstance(a, str) and isinstance(b, str) and a.strip() and b.strip()]
    if len(pairs) < 2:
        raise ValueError(f"CRA set {path}: needs at least 2 non-empty pairs, has {len(pairs)}")
    return pairs


def named_pairs(entry: str) -> tuple[str, Pairs]:
    """(set name, pairs) of a config entry: a built-in name or a file path (named by its stem)."""
    if entry in BUILTIN_SETS:
        return entry, builtin_pairs(entry)
    return Path(entry).stem, file_pairs(entry)


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
