"""What a stage would do, decided before it runs: its output and whether that output exists.

Every stage has a cheap `plan_<stage>(cfg) -> StagePlan` that derives its output version from
the rows it reads and its config (never from other versions or datasets in the stores), and
says whether that output is complete. The pipeline job skips a stage whose output exists, so a
re-run after a failure continues where it stopped and re-does nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pipeline.store import put_atomically, resolve_filesystem


@dataclass(frozen=True)
class StagePlan:
    stage: str
    output: str  # the version or path it writes; "" when only a run can name it (e.g. a new encoder's hash)
    exists: bool  # the output is complete: running the stage would do nothing
    reason: str  # one line: why it is skipped, or what it would do

    @property
    def shown_output(self) -> str:
        return self.output or "(named when it runs)"

    def line(self, action: str | None = None) -> str:
        action = action or ("skip" if self.exists else "run")
        return f"{self.stage:<16} {action:<5} {self.shown_output:<44} {self.reason}"


def not_ready(stage: str, why: str) -> StagePlan:
    """A stage whose inputs an earlier stage has not written yet."""
    return StagePlan(stage, "", False, f"inputs not written yet ({why})")


# ----------------------------------------------------------------- finished-run records
# A training stage's last act is writing its result next to its outputs; a re-run that finds
# it does nothing (no training, no merge, no evaluation, no new registry version).
RESULT_FILE = "result.json"


def result_path(storage: str, run_name: str) -> str:
    return f"{storage.rstrip('/')}/{run_name}/outputs/{RESULT_FILE}"


def read_result(storage: str, run_name: str) -> dict[str, Any] | None:
    fs, path = resolve_filesystem(result_path(storage, run_name))
    try:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read().decode())
    except (FileNotFoundError, OSError):
        return None


def write_result(storage: str, run_name: str, result: dict[str, Any]) -> None:
    fs, path = resolve_filesystem(result_path(storage, run_name))
    put_atomically(fs, path, json.dumps(result, indent=2, default=str))
