"""Stable content hashes and the code version recorded in every lineage record."""

from __future__ import annotations

import hashlib
import json
import subprocess
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent


def stable_hash(obj: Any, length: int = 12) -> str:
    """Short sha256 of the canonical JSON of `obj` (key order does not matter)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def rows_digest(table, chunk: int = 65536) -> str:
    """Short sha256 of a pyarrow table's rows in order: its values, not how Arrow happens to
    chunk them, so the same rows built twice hash alike."""
    h = hashlib.sha256(json.dumps(table.column_names).encode())
    for start in range(0, table.num_rows, chunk):
        part = table.slice(start, chunk)
        for name in table.column_names:
            h.update(json.dumps(part.column(name).to_pylist(), default=str).encode())
    return h.hexdigest()[:16]


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def weights_digest(module) -> str:
    """sha256 (hex) over a torch module's state dict (every parameter and buffer, by sorted name)
    as float32: the same weights give the same digest whatever dtype or device they were loaded in."""
    import torch

    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@cache
def code_version() -> dict[str, str | None]:
    """What code produced an artifact: the git commit when there is one, and always a
    digest of the library's source (jobs submitted with --working-dir have no .git)."""
    digest = hashlib.sha256()
    for folder in ("pipeline", "jobs", "schemas"):
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            digest.update(str(path.relative_to(REPO_ROOT)).encode())
            digest.update(path.read_bytes())
    try:
        package = metadata.version("llm2clip-pipeline")
    except metadata.PackageNotFoundError:
        package = None
    return {"git_commit": _git_commit(), "source_sha256": digest.hexdigest()[:16], "package": package}


def _git_commit() -> str | None:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None
