"""Store invariants every fault drill checks, written once.

`check_stores` reads every version of every store under a store URI: each must be readable
(its commits list only files that exist and match the schema) and no key may appear twice.
`assert_kept` checks that the rows committed before a kill are all still there.
"""

from __future__ import annotations

from collections import Counter

from pipeline.store import Store
from schemas import STORE_KEYS


def store_keys(store_uri: str) -> dict[tuple[str, str], list[tuple]]:
    """(store, version) -> every key of its committed rows, duplicates included."""
    out = {}
    for name, key in STORE_KEYS.items():
        store = Store(store_uri, name)
        for version in store.versions():
            table = store.read(version, columns=list(key))  # raises on a missing file or a schema mismatch
            out[(name, version)] = list(zip(*(table.column(k).to_pylist() for k in key)))
    return out


def check_stores(store_uri: str) -> dict[tuple[str, str], set[tuple]]:
    """Every version readable, no key twice; returns the keys for `assert_kept`."""
    keys = store_keys(store_uri)
    doubled = {where: [k for k, n in Counter(rows).items() if n > 1][:3] for where, rows in keys.items() if len(set(rows)) != len(rows)}
    assert not doubled, f"keys written twice: {doubled}"
    return {where: set(rows) for where, rows in keys.items()}


def assert_kept(before: dict[tuple[str, str], set[tuple]], after: dict[tuple[str, str], set[tuple]]) -> None:
    """Rows committed before a kill are still there after the re-run."""
    lost = {where: len(rows - after.get(where, set())) for where, rows in before.items() if rows - after.get(where, set())}
    assert not lost, f"rows lost: {lost}"
