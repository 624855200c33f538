"""Model references -> local folders, on whichever node needs the model.

A reference is a local path, a hub id (left to `from_pretrained`), a pyarrow filesystem
URI (s3://, gs://, hdfs://: a training run's output on shared storage), or an MLflow model
URI (models:/NAME/VERSION, models:/NAME@ALIAS, runs:/RUN/PATH). Resolving happens where
the model is loaded, so nothing assumes a filesystem shared between the driver and the
workers. This is the one place core code reaches MLflow: only to download a model URI, and
only when given one (the import is deferred, so core runs without MLflow installed).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

MLFLOW_PREFIXES = ("models:/", "runs:/", "mlflow-artifacts:/")


def is_mlflow_uri(ref: str) -> bool:
    return str(ref).startswith(MLFLOW_PREFIXES)


def is_remote_uri(ref: str) -> bool:
    """A filesystem URI other than a local path (s3://..., gs://...); file:// counts as local."""
    ref = str(ref)
    return "://" in ref and not ref.startswith("file://") and not is_mlflow_uri(ref)


def registry_source(ref: str, tracking_uri: str | None) -> str:
    """models:/NAME/VERSION[/path] or models:/NAME@ALIAS[/path] -> where that version's files are,
    looked up in the registry of `tracking_uri`. MLflow's own download resolves models:/ in the
    process-global registry (a local sqlite file unless set), not the server it is given."""
    if not ref.startswith("models:/"):
        return ref
    from mlflow import MlflowClient

    name, _, rest = ref[len("models:/"):].partition("/")
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    if "@" in name:
        name, alias = name.split("@", 1)
        version = client.get_model_version_by_alias(name, alias).version
    else:
        version, _, rest = rest.partition("/")
        if not version.isdigit():  # models:/m-<id>: a logged model, found through the tracking server
            return ref
    source = client.get_model_version_download_uri(name, version)
    return f"{source.rstrip('/')}/{rest}" if rest else source


def local_path(ref: str | Path, tracking_uri: str | None = None) -> str:
    """A local folder holding the referenced model (downloaded into a fresh temporary
    folder when it lives in MLflow or on remote storage), or the hub id as it is."""
    ref = str(ref)
    if is_mlflow_uri(ref):
        import mlflow.artifacts

        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        return mlflow.artifacts.download_artifacts(artifact_uri=registry_source(ref, uri), tracking_uri=uri,
                                                   dst_path=tempfile.mkdtemp(prefix="llm2clip-model-"))
    if ref.startswith("file://"):
        return ref[len("file://"):]
    if is_remote_uri(ref):
        import pyarrow.fs as pafs

        dest = tempfile.mkdtemp(prefix="llm2clip-model-")
        pafs.copy_files(ref, dest, destination_filesystem=pafs.LocalFileSystem())
        return dest
    return ref
