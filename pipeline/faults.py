"""Named crash points for fault drills: a one-line call in the code, a no-op unless armed.

    LLM2CLIP_CRASH_AT=train.step@3 python -m jobs.train_clip ...

kills the process (SIGKILL, as a preemption or the OOM killer would) the third time it
passes `crash_point("train.step")`. Several points are comma-separated. With
LLM2CLIP_CRASH_ONCE_DIR set, a point fires once across processes (a marker file there), so
the re-run of a drill passes it. Ray workers and actors inherit both variables through the
job's runtime_env (`pipeline.stages.runtime`).
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from pathlib import Path

CRASH_AT = "LLM2CLIP_CRASH_AT"
CRASH_ONCE_DIR = "LLM2CLIP_CRASH_ONCE_DIR"
_passes: Counter = Counter()


def armed() -> dict[str, int]:
    """{point: the pass that fires} from LLM2CLIP_CRASH_AT (`name` fires on the first pass)."""
    out = {}
    for item in filter(None, (p.strip() for p in os.environ.get(CRASH_AT, "").split(","))):
        name, _, nth = item.partition("@")
        out[name] = int(nth or 1)
    return out


def crash_point(name: str) -> None:
    points = armed()
    if name not in points:
        return
    _passes[name] += 1
    if _passes[name] != points[name]:
        return
    once = os.environ.get(CRASH_ONCE_DIR)
    if once:
        marker = Path(once) / name
        if marker.exists():
            return
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    print(f"crash point {name}: killing pid {os.getpid()}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def fault_env() -> dict[str, str]:
    """The drill variables of this process, for the runtime_env of its Ray workers."""
    return {k: os.environ[k] for k in (CRASH_AT, CRASH_ONCE_DIR) if os.environ.get(k)}
