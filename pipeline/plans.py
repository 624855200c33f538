"""What a stage would do, decided before it runs: its output and whether that output exists.

Every stage has a cheap `plan_<stage>(cfg) -> StagePlan` that derives its output version from
the rows it reads and its config (never from other versions or datasets in the stores), and
says whether that output is complete. The pipeline job skips a stage whose output exists, so a
re-run after a failure continues where it stopped and re-does nothing. A training stage's plan
also carries what it resolved on the way (its inputs, the finished run's result), so the run
that follows does not resolve them again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

from pipeline.store import read_record, resolve_filesystem, write_record

R = TypeVar("R")


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


P = TypeVar("P", bound=StagePlan)


def not_ready(stage: str, why: str, kind: type[P] = StagePlan) -> P:
    """A stage whose inputs an earlier stage has not written yet."""
    return kind(stage, "", False, f"inputs not written yet ({why})")


# ----------------------------------------------------------------- finished-run records
# A training stage's last act is writing its result next to its outputs; a re-run that finds
# it does nothing (no training, no merge, no evaluation, no new registry version).
RESULT_FILE = "result.json"


def result_path(storage: str, run_name: str) -> str:
    return f"{storage.rstrip('/')}/{run_name}/outputs/{RESULT_FILE}"


def read_result(storage: str, run_name: str, kind: type[R]) -> R | None:
    """The result a finished run recorded, as its stage's result type; None when it has not finished."""
    return read_record(*resolve_filesystem(result_path(storage, run_name)), kind)


def write_result(storage: str, run_name: str, result: object) -> None:
    write_record(*resolve_filesystem(result_path(storage, run_name)), result)
