"""The corpus record: which caption versions a built everyday corpus (`jobs.corpus`) is made
of, kept at `{store}/_corpus/{name}.json`; `finetune_text.pairs: [{corpus: NAME}]` reads it."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.store import read_record, resolve_filesystem, write_record


@dataclass(frozen=True)
class CorpusVersions:
    """The caption version of each role: seeds, then the texts generated from them."""

    seed: str
    short: str
    dense: str
    paraphrase: str


@dataclass(frozen=True)
class CorpusRecord:
    name: str
    items: int
    versions: CorpusVersions
    mlflow_run_id: str | None = None


def _path(store_uri: str, name: str):
    fs, root = resolve_filesystem(store_uri)
    return fs, f"{root.rstrip('/')}/_corpus/{name}.json"


def read_corpus(store_uri: str, name: str) -> CorpusRecord | None:
    return read_record(*_path(store_uri, name), CorpusRecord)


def write_corpus(store_uri: str, record: CorpusRecord) -> None:
    write_record(*_path(store_uri, record.name), record)


def corpus_versions(store_uri: str, name: str) -> CorpusVersions:
    """The caption versions of a built corpus; a clear error when it has not been built."""
    record = read_corpus(store_uri, name)
    if record is None:
        raise ValueError(f"corpus {name!r} has not been built in {store_uri}: run python -m jobs.corpus first")
    return record.versions
