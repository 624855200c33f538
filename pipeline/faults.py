"""Named crash points for fault drills: a one-line call in the code, a no-op unless armed.

    LLM2CLIP_CRASH_AT=train.step@3 python -m jobs.train_clip ...

kills the process (SIGKILL, as a preemption or the OOM killer would) the third time it
passes `crash_point("train.step")`. `train.checkpoint_saving@2:driver` kills the job's driver
instead (a worker passing the point knows it from LLM2CLIP_DRIVER_PID): the driver dies at
that moment of the workers' work, e.g. while a checkpoint is being saved. `@step12` fires where
the code passes step 12 (`crash_point(name, step=...)`), whichever process gets there: a drill
stays deterministic when a killed worker group restarts and counts its passes anew. Several
points are comma-separated. With LLM2CLIP_CRASH_ONCE_DIR set, a point fires once across processes (a
marker file there), so the re-run of a drill, or a restarted worker, passes it. Ray workers and
actors inherit the variables through the job's runtime_env (`pipeline.stages.runtime`).
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

CRASH_AT = "LLM2CLIP_CRASH_AT"
CRASH_ONCE_DIR = "LLM2CLIP_CRASH_ONCE_DIR"
DRIVER_PID = "LLM2CLIP_DRIVER_PID"
_passes: Counter = Counter()


@dataclass(frozen=True)
class Armed:
    nth: int = 1
    """The pass that fires (counted per process)."""
    target: str = "self"
    """`self`: the process passing the point dies; `driver`: the job's driver does."""
    step: int | None = None
    """Fire where the code passes this training step instead (`@stepN`)."""


def armed() -> dict[str, Armed]:
    """{point: how it fires} from LLM2CLIP_CRASH_AT (`name` fires on the first pass)."""
    out = {}
    for item in filter(None, (p.strip() for p in os.environ.get(CRASH_AT, "").split(","))):
        item, _, target = item.partition(":")
        name, _, nth = item.partition("@")
        if target not in ("", "self", "driver"):
            raise ValueError(f"{CRASH_AT}: {item}:{target}: the target is self or driver")
        if nth.startswith("step") and nth[4:].isdigit():
            out[name] = Armed(target=target or "self", step=int(nth[4:]))
        elif (nth or "1").isdigit():
            out[name] = Armed(int(nth or 1), target or "self")
        else:
            raise ValueError(f"{CRASH_AT}: {item}: write name, name@N (Nth pass) or name@stepN")
    return out


def crash_point(name: str, step: int | None = None) -> None:
    points = armed()
    if name not in points:
        return
    point = points[name]
    if point.step is not None:
        if step != point.step:
            return
    else:
        _passes[name] += 1
        if _passes[name] != point.nth:
            return
    once = os.environ.get(CRASH_ONCE_DIR)
    if once:
        marker = Path(once) / name
        marker.parent.mkdir(parents=True, exist_ok=True)
        try:  # created exclusively: of the ranks that reach a point together, exactly one fires it
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
    pid = int(os.environ[DRIVER_PID]) if point.target == "driver" else os.getpid()
    print(f"crash point {name}: killing pid {pid} ({point.target})", flush=True)
    os.kill(pid, signal.SIGKILL)


def fault_env() -> dict[str, str]:
    """The drill variables of this process (the driver), for the runtime_env of its Ray workers."""
    env = {k: os.environ[k] for k in (CRASH_AT, CRASH_ONCE_DIR) if os.environ.get(k)}
    if env:
        env[DRIVER_PID] = os.environ.get(DRIVER_PID, str(os.getpid()))
    return env
