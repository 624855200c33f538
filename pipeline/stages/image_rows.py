"""Per-image rows that Ray Data actors compute into a store keyed by image_id (a frozen tower's
features, the search index): which images a version still lacks, and one commit of what was
computed. Readable rows go into the version; unreadable images go to the rejects store with
their reasons. The counts must reconcile: images = written + skipped + rejected."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import ray

from pipeline.lineage import Lineage
from pipeline.store import Store, append_image_rejects

STATUS_COLUMNS = ["image_id", "reason", "detail"]  # every computed row has them; reason "" = readable


def new_images(batch: pa.Table, existing: pa.Array) -> pa.Table:
    """The rows whose image_id is not in `existing` (what a version keyed by image_id lacks)."""
    # Arrow's hash lookup: np.isin on object (string) arrays compares every pair (quadratic)
    return batch.filter(pc.invert(pc.is_in(batch.column("image_id"), value_set=existing)))


def stored_ids(store: Store, version: str) -> pa.Array:
    """The image ids `version` already holds (none when it does not exist yet)."""
    if not store.commits(version):
        return pa.array([], pa.string())
    return store.read(version, columns=["image_id"]).column("image_id").combine_chunks()


@dataclass(frozen=True)
class Committed:
    written: int
    rejected: dict[str, int]  # reason -> images


def _status(batch: pa.Table) -> pa.Table:
    return batch.select(STATUS_COLUMNS)


def _readable(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.equal(batch.column("reason"), "")).drop_columns(["reason", "detail"])


def commit_image_rows(store: Store, version: str, lineage: Lineage, computed: ray.data.Dataset, images: int, skipped: int,
                      cpus: float = 1.0) -> Committed:
    """`computed` (materialized) into `version` of `store` in one commit, its unreadable images
    into the rejects store's `<lineage.stage>.<version>`. Every task runs at `cpus`: beside a
    running service a small cluster may have less than a whole CPU free."""
    status = pa.concat_tables(ray.get(computed.map_batches(_status, batch_format="pyarrow", num_cpus=cpus).to_arrow_refs()))
    bad = status.filter(pc.not_equal(status.column("reason"), ""))
    with store.begin(version, lineage) as txn:
        computed.map_batches(_readable, batch_format="pyarrow", num_cpus=cpus).write_parquet(
            txn.staging_dir, filesystem=txn.store.fs, ray_remote_args={"num_cpus": cpus})
        commit = txn.commit({"images": images, "skipped": skipped, "rejected": bad.num_rows})
    written = commit.num_rows if commit else 0
    append_image_rejects(store.store_uri, lineage.stage, f"{lineage.stage}.{version}", bad, lineage)
    if images != written + skipped + bad.num_rows:
        raise RuntimeError(f"{store.name} {version}: counts do not reconcile: {images} images != {written} written + "
                           f"{skipped} skipped + {bad.num_rows} rejected")
    return Committed(written, dict(Counter(bad.column("reason").to_pylist())))
