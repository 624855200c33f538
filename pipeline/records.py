"""Typed records: the dataclasses that cross a boundary (a job's result, a finished run's
record, a refresh record, a lineage record) go to JSON and come back as themselves.

Field names are the JSON keys (`to_json`, `--summary-json`, the records on storage); code and
tests read attributes, never prose. Prose is for printing only: `printable` labels each field
from its metadata (`label("...")`), leaves out the fields marked `hidden()`, and adds what a
record's `notes()` says (ready-to-run commands, rates). JSON goes through pydantic's
`TypeAdapter`, which handles nested dataclasses, unions and optional fields, and ignores keys a
newer or older writer added.
"""

from __future__ import annotations

import dataclasses
from functools import cache
from typing import Any, TypeVar

from pydantic import TypeAdapter

T = TypeVar("T")
_LABEL, _HIDDEN = "label", "hidden"


def label(text: str, **kwargs: Any) -> Any:
    """A dataclass field printed under `text` (`kwargs` as for `dataclasses.field`)."""
    return dataclasses.field(metadata={_LABEL: text}, **kwargs)


def hidden(**kwargs: Any) -> Any:
    """A dataclass field kept in the JSON but left out of the printout."""
    return dataclasses.field(metadata={_HIDDEN: True}, **kwargs)


@dataclasses.dataclass(kw_only=True)
class Tracked:
    """What every job's result carries: the MLflow run it was tracked in (set by `tracked_by`)."""

    mlflow_run_id: str | None = hidden(default=None)
    mlflow_url: str | None = label("mlflow run", default=None)

    def tracked_by(self, tracker: Any) -> None:
        """Record the run of a `pipeline.stages.tracking.Tracker` (a disabled one leaves None)."""
        self.mlflow_run_id, self.mlflow_url = tracker.run_id, tracker.url


@dataclasses.dataclass(kw_only=True)
class Reported(Tracked):
    """A result with a report (evaluate's results.md, in Markdown): the job prints it once, just
    before its summary and links."""

    report_markdown: str | None = hidden(default=None)


@cache
def _adapter(cls: type) -> TypeAdapter:
    return TypeAdapter(cls)


def to_json(record: Any) -> Any:
    """A record as JSON-ready values, keyed by field name."""
    return _adapter(type(record)).dump_python(record, mode="json")


def from_json(cls: type[T], data: Any) -> T:
    """The record `to_json` wrote (keys it does not know are ignored)."""
    return _adapter(cls).validate_python(data)


def printable(value: Any) -> Any:
    """Plain values for printing: a record's fields under their labels (a `Tracked` record's
    run last), then its `notes()`; nested records the same way."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        def shown(fields) -> dict[str, Any]:
            return {f.metadata.get(_LABEL, f.name.replace("_", " ")): printable(getattr(value, f.name))
                    for f in fields if not f.metadata.get(_HIDDEN)}

        tracking = {f.name for f in dataclasses.fields(Tracked)}
        notes = value.notes() if callable(getattr(value, "notes", None)) else {}
        return (shown(f for f in dataclasses.fields(value) if f.name not in tracking)
                | {k: printable(v) for k, v in notes.items() if v is not None}
                | shown(f for f in dataclasses.fields(value) if f.name in tracking))
    if isinstance(value, dict):
        return {str(k): printable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [printable(v) for v in value]
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)
