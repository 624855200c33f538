"""The versioned Parquet store: atomic commits, idempotent rewrites, schema checks, lineage."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.lineage import Lineage, StoreInput
from pipeline.store import Commit, SchemaMismatchError, Store, StoreError, VersionNotFoundError
from schemas import embeddings_schema

NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)


def captions_table(n: int, start: int = 0) -> pa.Table:
    return pa.Table.from_pylist(
        [
            {
                "caption_id": f"c{i:06d}",
                "image_id": f"img{i // 2:05d}",
                "text": f"caption number {i}",
                "source": "original",
                "caption_version": "v1",
                "model": "",
                "prompt_id": "",
                "created_at": NOW,
            }
            for i in range(start, start + n)
        ]
    )


def test_append_read_and_lineage(tmp_path):
    store = Store(str(tmp_path), "captions")
    lineage = Lineage(stage="test", inputs=[StoreInput("manifest", "m", ["c1"])], counts={"rows": 10})
    commit = store.append("v1", captions_table(10), lineage)
    assert commit is not None and commit.num_rows == 10
    assert store.versions() == ["v1"]
    table = store.read("v1")
    assert table.num_rows == 10
    assert table.schema.field("text").type == pa.string()
    assert store.lineage("v1") == [lineage] and store.commits("v1")[0].num_rows == 10  # read back as written


def test_rewrite_is_idempotent(tmp_path):
    store = Store(str(tmp_path), "captions")
    store.append("v1", captions_table(10))
    assert store.append("v1", captions_table(10)) is None  # nothing new: no commit at all
    second = store.append("v1", captions_table(10, start=5))  # 5 old + 5 new rows
    assert second.num_rows == 5
    ids = store.read("v1").column("caption_id").to_pylist()
    assert len(ids) == len(set(ids)) == 15
    # rows repeated inside one write are kept once too
    doubled = pa.concat_tables([captions_table(3, start=100), captions_table(3, start=100)])
    assert store.append("v1", doubled).num_rows == 3


def test_versions_are_separate(tmp_path):
    store = Store(str(tmp_path), "captions")
    store.append("v1", captions_table(4))
    store.append("v2", captions_table(4))
    assert store.versions() == ["v1", "v2"]
    assert store.read("v2").num_rows == 4
    with pytest.raises(VersionNotFoundError, match="no version 'v3'.*v1"):
        store.read("v3")
    with pytest.raises(StoreError, match="invalid version name"):
        store.append("../escape", captions_table(1))


WRITER = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {repo!r})
    from tests.test_store import captions_table
    from pipeline.lineage import Lineage
    from pipeline.store import Store
    store = Store({uri!r}, "captions")
    with store.begin("v1", Lineage(stage="slow-writer")) as txn:
        for i in range(10_000):
            txn.write(captions_table(50, start=1000 + i * 50))
            print("wrote", i, flush=True)
            time.sleep(0.02)
        txn.commit()
    """
)


def _kill_writer_after(tmp_path: Path, parts: int) -> None:
    repo = str(Path(__file__).resolve().parent.parent)
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER.format(repo=repo, uri=str(tmp_path))], stdout=subprocess.PIPE, text=True
    )
    for line in proc.stdout:
        if line.strip() == f"wrote {parts}":
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def test_killed_writer_leaves_nothing_visible(tmp_path):
    store = Store(str(tmp_path), "captions")
    store.append("v1", captions_table(10))  # an earlier, complete commit
    _kill_writer_after(tmp_path, parts=5)
    staged = list((tmp_path / "captions" / "v1" / "data").rglob("*.parquet"))
    assert len(staged) > 6, "the killed writer should have left staged files on disk"
    assert store.read("v1").num_rows == 10  # only the complete commit is visible
    assert len(store.commits("v1")) == 1
    removed = store.gc("v1")
    assert len(removed) == 1
    assert store.read("v1").num_rows == 10


def test_killed_first_writer_creates_no_version(tmp_path):
    store = Store(str(tmp_path), "captions")
    _kill_writer_after(tmp_path, parts=3)
    assert store.versions() == []
    with pytest.raises(VersionNotFoundError):
        store.read("v1")


def test_write_with_bad_types_names_the_column(tmp_path):
    store = Store(str(tmp_path), "captions")
    bad = captions_table(2).set_column(2, "text", pa.array([{"a": 1}, {"a": 2}]))
    with pytest.raises(SchemaMismatchError, match="column 'text' has type struct"):
        store.append("v1", bad)
    with pytest.raises(SchemaMismatchError, match="missing column 'source'"):
        store.append("v1", captions_table(2).drop_columns(["source"]))
    assert store.versions() == []


def test_read_of_foreign_file_gives_clear_error(tmp_path):
    store = Store(str(tmp_path), "captions")
    commit = store.append("v1", captions_table(3))
    # Someone overwrites a committed file with data of another shape.
    path = tmp_path / "captions" / "v1" / commit.files[0]
    pq.write_table(pa.table({"caption_id": [1, 2], "text": ["a", "b"]}), path)
    with pytest.raises(SchemaMismatchError) as err:
        store.read("v1")
    message = str(err.value)
    assert "column 'caption_id' has type int64, expected string" in message
    assert "missing column 'image_id'" in message and str(path) in message


def test_embeddings_are_fixed_size_lists(tmp_path):
    store = Store(str(tmp_path), "embeddings")
    rows = [
        {"caption_id": f"c{i}", "image_id": "i", "text_sha256": "s", "encoder_version": "e", "dim": 4, "embedding": [0.1 * i] * 4}
        for i in range(3)
    ]
    store.append("e", pa.Table.from_pylist(rows))
    table = store.read("e")
    assert pa.types.is_fixed_size_list(table.schema.field("embedding").type)
    assert table.schema.field("embedding").type.list_size == 4
    with pytest.raises(SchemaMismatchError, match="one dim"):
        store.append("e", pa.Table.from_pylist(rows[:1] + [{**rows[1], "caption_id": "x", "dim": 5, "embedding": [0.0] * 5}]))


def test_ray_data_can_write_into_a_transaction(tmp_path, ray_session):
    """Stages let Ray Data write files into the commit's staging folder, then commit."""
    import ray

    store = Store(str(tmp_path), "captions")
    with store.begin("v1", Lineage(stage="ray")) as txn:
        ray.data.from_arrow(captions_table(40)).repartition(4).write_parquet(txn.staging_dir)
        assert store.versions() == []  # not visible before commit
        commit = txn.commit()
    assert commit.num_rows == 40 and len(commit.files) >= 2
    assert sorted(store.read("v1").column("caption_id").to_pylist()) == [f"c{i:06d}" for i in range(40)]


def _vector_rows(n: int, value: float = 0.25, start: int = 0) -> list[dict]:
    return [{"caption_id": f"c{i}", "image_id": "i", "text_sha256": "s", "encoder_version": "e", "dim": 4,
             "embedding": [value * (i + 1), -value, 0.5, 1.0]} for i in range(start, start + n)]


def _float32_version_as_written_before(root: Path, version: str, rows: list[dict]) -> None:
    """A version as the store wrote it before float16 existed, by hand: one float32 file and its commit record."""
    commit_id = "20260101T000000000000Z-old00000"
    table = pa.Table.from_pylist(rows, schema=embeddings_schema(4, pa.float32()))
    (root / "embeddings" / version / "data" / commit_id).mkdir(parents=True)
    pq.write_table(table, root / "embeddings" / version / "data" / commit_id / "part-00000.parquet", compression="zstd")
    record = Commit(commit_id, "embeddings", version, (f"data/{commit_id}/part-00000.parquet",), len(rows), NOW.isoformat(),
                    Lineage(stage="embed", dim=4))
    (root / "embeddings" / version / "_commits").mkdir()
    (root / "embeddings" / version / "_commits" / f"{commit_id}.json").write_text(record.to_json())


def _as_float32(table: pa.Table) -> np.ndarray:
    return np.asarray(table.column("embedding").combine_chunks().flatten().to_numpy(), np.float32).reshape(table.num_rows, -1)


def test_float32_versions_stay_readable_beside_float16_ones(tmp_path):
    store = Store(str(tmp_path), "embeddings")
    _float32_version_as_written_before(tmp_path, "enc-old", _vector_rows(3))
    store.append("enc-new", pa.Table.from_pylist(_vector_rows(3)))  # today's default: float16
    old, new = store.read("enc-old"), store.read("enc-new")
    assert old.schema.field("embedding").type.equals(pa.list_(pa.float32(), 4))
    assert new.schema.field("embedding").type.equals(pa.list_(pa.float16(), 4))
    assert (store.vector_type("enc-old"), store.vector_type("enc-new")) == (pa.float32(), pa.float16())
    np.testing.assert_allclose(_as_float32(new), _as_float32(old), rtol=1e-3)  # float16 keeps ~3 significant digits
    assert [b.num_rows for b in store.iter_batches("enc-old")] == [3]
    # a version keeps its type: rows added to the float32 one are float32, whatever they came as
    store.append("enc-old", pa.Table.from_pylist(_vector_rows(2, start=3)))
    assert store.read("enc-old").num_rows == 5 and store.vector_type("enc-old") == pa.float32()
    with pytest.raises(SchemaMismatchError, match="holds float vectors; one version holds one type"):
        store.begin("enc-old", value_type=pa.float16())
    # a writer that stages float16 files into the float32 version (Ray Data's write) fails at commit
    with store.begin("enc-old") as txn:
        pq.write_table(store.prepare(pa.Table.from_pylist(_vector_rows(1, start=9)), pa.float16()), f"{txn.staging_dir}/part-x.parquet")
        with pytest.raises(SchemaMismatchError, match="staged file .* column 'embedding' has type fixed_size_list<element: halffloat>"):
            txn.commit()
    assert store.read("enc-old").num_rows == 5
    with Store(str(tmp_path), "features").begin("vis-x") as txn:
        assert txn.value_type == pa.float32()  # the feature store stays float32


def test_a_value_beyond_float16_fails_instead_of_becoming_inf(tmp_path):
    store = Store(str(tmp_path), "embeddings")
    too_big = pa.Table.from_pylist(_vector_rows(2, value=70_000.0))  # float16 ends at 65504
    with pytest.raises(SchemaMismatchError, match=r"values beyond the range of halffloat.*embed.store_dtype: float32"):
        store.append("enc-new", too_big)
    assert store.versions() == []
    with store.begin("enc-wide", value_type=pa.float32()) as txn:  # float32 holds it
        txn.write(too_big)
        txn.commit()
    assert store.read("enc-wide").column("embedding").to_pylist()[1][0] == 140_000.0
