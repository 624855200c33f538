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

    name, _, rest = pin_alias(ref, tracking_uri)[len("models:/"):].partition("/")
    version, _, rest = rest.partition("/")
    if not version.isdigit():  # models:/m-<id>: a logged model, found through the tracking server
        return ref
    source = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri).get_model_version_download_uri(name, version)
    return f"{source.rstrip('/')}/{rest}" if rest else source


def pin_alias(ref: str, tracking_uri: str | None) -> str:
    """models:/NAME@ALIAS[/path] -> models:/NAME/VERSION[/path], the version the alias names now
    (so every loader gets the same weights if the alias moves meanwhile); other references as they are."""
    if not ref.startswith("models:/") or "@" not in ref.split("/")[1]:
        return ref
    from mlflow import MlflowClient

    name, _, rest = ref[len("models:/"):].partition("/")
    name, alias = name.split("@", 1)
    version = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri).get_model_version_by_alias(name, alias).version
    return f"models:/{name}/{version}" + (f"/{rest}" if rest else "")


def cache_dir() -> str:
    """This node's model cache: LLM2CLIP_MODEL_CACHE, else {LLM2CLIP_RUN_DIR}/model-cache (the
    node's scratch), else the temp folder. Never shared between nodes."""
    explicit = os.environ.get("LLM2CLIP_MODEL_CACHE")
    if explicit:
        return explicit
    scratch = os.environ.get("LLM2CLIP_RUN_DIR") or tempfile.gettempdir()
    return os.path.join(scratch, "model-cache")


def local_path(ref: str | Path, tracking_uri: str | None = None) -> str:
    """A local folder holding the referenced model, or the hub id as it is. A model in MLflow or
    on remote storage is downloaded, once per node, into this node's cache under a key of its
    content: a registered version's (immutable) source, or the names, sizes and mtimes of the
    files under a storage prefix. Call it where the model is loaded (in the actor or worker):
    a path resolved on one node means nothing on another."""
    ref = str(ref)
    if is_mlflow_uri(ref):
        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        source = registry_source(ref, uri)
        return _cached(f"mlflow:{source}", lambda dest: _download_mlflow(source, uri, dest))
    if ref.startswith("file://"):
        return ref[len("file://"):]
    if is_remote_uri(ref):
        from pipeline import uri as locations

        files = [(f.path, f.size, f.mtime_ns) for f in locations.list_files(ref)]
        if not files:
            raise locations.LocationError(f"model {ref}: no files there")
        return _cached(f"{ref}:{files}", lambda dest: locations.download_dir(ref, dest))
    return ref


def _download_mlflow(source: str, tracking_uri: str | None, dest: str) -> None:
    import mlflow.artifacts

    mlflow.artifacts.download_artifacts(artifact_uri=source, tracking_uri=tracking_uri, dst_path=dest)


def _cached(identity: str, download) -> str:
    """The cache folder for `identity`, downloaded into a private folder first and renamed into
    place, so concurrent loaders on one node never see half a model."""
    import hashlib
    import shutil

    root = cache_dir()
    target = os.path.join(root, hashlib.sha256(identity.encode()).hexdigest()[:24])
    if os.path.isdir(target):
        return _single_child(target)
    os.makedirs(root, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".download-", dir=root)
    try:
        download(staging)
        try:
            os.rename(staging, target)
        except OSError:  # another loader on this node finished first: theirs is the same content
            pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return _single_child(target)


def _single_child(folder: str) -> str:
    """MLflow downloads `model/` into the destination: the model is that folder."""
    entries = [e for e in os.listdir(folder) if not e.startswith(".")]
    if len(entries) == 1 and os.path.isdir(os.path.join(folder, entries[0])):
        return os.path.join(folder, entries[0])
    return folder
