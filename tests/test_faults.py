"""Fault drills on the stores: a writer SIGKILLed between each pair of a commit's file operations.

Each drill runs a real writer process with one crash point armed (`pipeline.faults`), checks the
invariants (`tests.invariants`: every version readable, no key twice, committed rows kept), runs
the writer again unarmed, and checks that the rows arrive once and that `gc` clears what the
dead writer left (its staged folder, a temporary commit record).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline.faults import CRASH_AT, CRASH_ONCE_DIR, Armed, armed, crash_point
from pipeline.captions import caption_rows
from pipeline.lineage import Lineage
from pipeline.store import Store, utc_now
from schemas import STORE_SCHEMAS
from tests.invariants import assert_kept, check_stores

REPO = Path(__file__).resolve().parent.parent
WRITER = """
import sys
import pyarrow as pa
from pipeline.captions import caption_rows
from pipeline.lineage import Lineage
from pipeline.store import Store, utc_now
from schemas import STORE_SCHEMAS
store = Store(sys.argv[1], "captions")
rows = [r for i in range(20) for r in caption_rows(f"img{i}", [f"caption {i}"], "v", "original", utc_now())]
with store.begin("v", Lineage(stage="drill")) as txn:
    txn.write(pa.Table.from_pylist(rows[:10], schema=STORE_SCHEMAS["captions"]))
    txn.write(pa.Table.from_pylist(rows[10:], schema=STORE_SCHEMAS["captions"]))
    txn.commit()
"""


def _write(uri: str, crash_at: str | None = None, once: Path | None = None) -> int:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop(CRASH_AT, None)
    if crash_at:
        env[CRASH_AT] = crash_at
    if once:
        env[CRASH_ONCE_DIR] = str(once)
    return subprocess.run([sys.executable, "-c", WRITER, uri], env=env, cwd=REPO, timeout=120).returncode


def _seed(uri: str) -> None:
    rows = caption_rows("img-before", ["committed before the kill"], "v", "original", utc_now())
    Store(uri, "captions").append("v", pa.Table.from_pylist(rows, schema=STORE_SCHEMAS["captions"]), Lineage(stage="seed"))


@pytest.mark.parametrize("point, visible", [
    ("store.write.part_staged@2", False),  # one part staged, the second being written
    ("store.commit.before_record", False),  # every part staged, no record yet
    ("store.put.before_move", False),  # the record written beside its final name, not moved
    ("store.commit.after_record", True),  # committed, the writer dies before it returns
])
def test_a_writer_killed_inside_a_commit_loses_and_doubles_nothing(tmp_path, point, visible):
    uri = str(tmp_path / "store")
    _seed(uri)
    before = check_stores(uri)
    assert _write(uri, point) == -signal.SIGKILL
    store = Store(uri, "captions")
    after_kill = check_stores(uri)
    assert_kept(before, after_kill)
    assert (store.num_rows("v") == 21) is visible and store.num_rows("v") in (1, 21)
    assert _write(uri) == 0  # the re-run
    final = check_stores(uri)
    assert_kept(after_kill, final)
    assert store.num_rows("v") == 21
    left = store.gc("v")
    assert bool(left) is not visible  # a dead writer's staged folder (and temporary record) is cleared
    version_dir = Path(uri) / "captions" / "v"
    assert not list((version_dir / "_commits").glob(".tmp-*"))
    assert {p.name for p in (version_dir / "data").iterdir()} == {c.commit_id for c in store.commits("v")}
    assert check_stores(uri) == final


def test_a_crash_point_fires_on_its_nth_pass_and_once_across_processes(tmp_path):
    uri = str(tmp_path / "store")
    once = tmp_path / "once"
    assert _write(uri, "store.write.part_staged@3") == 0  # only two parts: the third pass never comes
    assert _write(str(tmp_path / "other"), "store.write.part_staged@2", once) == -signal.SIGKILL
    assert _write(str(tmp_path / "other"), "store.write.part_staged@2", once) == 0  # fired once already
    assert (once / "store.write.part_staged").is_file()


def test_a_driver_target_kills_the_driver_not_the_process_passing_the_point(tmp_path):
    """`point:driver` (a worker kills its job's driver, e.g. while a checkpoint is saved)."""
    driver = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    env = {**os.environ, "PYTHONPATH": str(REPO), CRASH_AT: "drill.point@2:driver", "LLM2CLIP_DRIVER_PID": str(driver.pid)}
    worker = "from pipeline.faults import crash_point\nfor _ in range(3): crash_point('drill.point')\nprint('worker lives')"
    out = subprocess.run([sys.executable, "-c", worker], env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "worker lives" in out.stdout, out.stderr
    assert driver.wait(timeout=30) == -signal.SIGKILL
    bad = {**env, CRASH_AT: "drill.point:elsewhere"}
    out = subprocess.run([sys.executable, "-c", worker], env=bad, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "the target is self or driver" in out.stderr


def test_a_step_point_fires_where_the_step_is_passed_whatever_the_pass_count(monkeypatch):
    """`@stepN`: a restarted worker group counts its passes anew, so drills name the step."""
    monkeypatch.setenv(CRASH_AT, "train.step@step3:driver,store.put.before_move@2")
    assert armed() == {"train.step": Armed(1, "driver", 3), "store.put.before_move": Armed(2, "self", None)}
    fired = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: fired.append((pid, sig)))
    monkeypatch.setenv("LLM2CLIP_DRIVER_PID", "4242")
    for step in (1, 2, 4, 5):
        crash_point("train.step", step=step)
    assert fired == []
    crash_point("train.step", step=3)
    assert fired == [(4242, signal.SIGKILL)]
    monkeypatch.setenv(CRASH_AT, "train.step@stepx")
    with pytest.raises(ValueError, match="name@stepN"):
        armed()
