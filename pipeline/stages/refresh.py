"""`refresh`: the scheduled job. Ingest new images, recaption the images that lack the
current caption version, embed the captions that lack the current encoder's embeddings.

Every step is incremental, so a refresh after which nothing arrived does no model work
(recaption starts no engine), and a failed refresh can simply be run again. Each step
gets an MLflow run nested under the refresh's run. Every refresh, failed or not, leaves
a record under `{store}/_refresh/{dataset}/` (JSON, any pyarrow filesystem); `--status`
prints the last one and exits 0 only if it succeeded, for schedulers and on-call humans.
"""

from __future__ import annotations

import json
import logging
import traceback
import uuid
from dataclasses import dataclass

from pipeline.config import PipelineConfig, config_to_dict
from pipeline.records import Tracked, hidden, label, to_json
from pipeline.stages import tracking
from pipeline.stages.embed import EmbedResult, run_embed
from pipeline.stages.ingest import run_ingest
from pipeline.stages.ingest_writer import IngestResult
from pipeline.stages.recaption import RecaptionResult, run_recaption
from pipeline.store import Store, read_record, resolve_filesystem, utc_now, write_record

log = logging.getLogger(__name__)


@dataclass
class RefreshResult(Tracked):
    """A refresh, as it ran; also its record on storage."""

    dataset: str
    started_at: str
    status: str = "running"  # running | succeeded | failed
    new_images_since_last_refresh: int = label("images added to the manifest since the last refresh", default=0)
    last_refresh: str | None = None  # when the last successful refresh started
    ingest: IngestResult | None = None
    recaption: RecaptionResult | None = None
    embed: EmbedResult | None = None
    manifest_commits: list[str] = hidden(default_factory=list)
    error: str | None = None
    finished_at: str | None = hidden(default=None)


# ----------------------------------------------------------------- records
def _records_dir(cfg: PipelineConfig, dataset: str):
    fs, root = resolve_filesystem(cfg.store.uri)
    return fs, f"{root.rstrip('/')}/_refresh/{dataset}"


def refresh_records(cfg: PipelineConfig, dataset: str | None = None) -> list[RefreshResult]:
    """Every refresh record of a dataset, oldest first."""
    import pyarrow.fs as pafs

    fs, folder = _records_dir(cfg, dataset or cfg.ingest.dataset)
    infos = [i for i in fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
             if i.base_name.endswith(".json") and not i.base_name.startswith(".")]  # not a record being written
    records = (read_record(fs, info.path, RefreshResult) for info in sorted(infos, key=lambda i: i.base_name))
    return [r for r in records if r is not None]  # None: removed while listed


def _write_record(cfg: PipelineConfig, result: RefreshResult) -> None:
    fs, folder = _records_dir(cfg, result.dataset)
    name = result.started_at.replace(":", "").replace("-", "").replace("+0000", "Z") + f"-{uuid.uuid4().hex[:6]}"
    result.finished_at = utc_now().isoformat()
    write_record(fs, f"{folder}/{name}.json", result)


def refresh_status(cfg: PipelineConfig) -> int:
    """Print the last refresh record; 0 if it succeeded, 1 if it failed or none exists."""
    records = refresh_records(cfg)
    if not records:
        print(f"no refresh has run for dataset {cfg.ingest.dataset!r} in {cfg.store.uri}")
        return 1
    last = records[-1]
    ok = [r for r in records if r.status == "succeeded"]
    print(json.dumps(to_json(last), indent=2))
    print(f"\nlast refresh: {last.status} (started {last.started_at}); "
          f"last success: {ok[-1].started_at if ok else 'never'}; {len(records)} refreshes recorded")
    return 0 if last.status == "succeeded" else 1


# ----------------------------------------------------------------- the job
def run_refresh(cfg: PipelineConfig, tracker: tracking.Tracker) -> RefreshResult:
    dataset = cfg.recaption.dataset or cfg.ingest.dataset
    previous = [r for r in refresh_records(cfg, dataset) if r.status == "succeeded"]
    result = RefreshResult(dataset=dataset, started_at=utc_now().isoformat(timespec="seconds"))
    result.last_refresh = previous[-1].started_at if previous else None
    child_mlflow = cfg.mlflow.model_copy(update={"parent_run_id": tracker.run_id}) if tracker.enabled else cfg.mlflow
    resolved = config_to_dict(cfg)

    def step(name: str, fn, step_cfg: PipelineConfig):
        log.info("refresh: %s", name)
        with tracking.start_run(child_mlflow, name, resolved, run_name=f"refresh/{name}") as child:
            return fn(step_cfg, child)

    try:
        if cfg.refresh.ingest:
            result.ingest = step("ingest", run_ingest, cfg)
        manifest = Store(cfg.store.uri, "manifest")
        commits = manifest.commits(dataset)
        result.manifest_commits = [c.commit_id for c in commits]
        seen = set(previous[-1].manifest_commits) if previous else set()
        result.new_images_since_last_refresh = sum(c.num_rows for c in commits if c.commit_id not in seen)
        result.recaption = step("recaption", run_recaption, cfg)
        if cfg.refresh.embed:
            captions = Store(cfg.store.uri, "captions")
            versions = [v for v in [*cfg.embed.caption_versions, result.recaption.caption_version] if captions.commits(v)]
            embed_cfg = cfg.model_copy(update={"embed": cfg.embed.model_copy(update={"caption_versions": list(dict.fromkeys(versions))})})
            result.embed = step("embed", run_embed, embed_cfg)
        result.status = "succeeded"
    except Exception as e:
        result.status = "failed"
        result.error = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=5)}"
        raise
    finally:
        result.tracked_by(tracker)
        tracker.set_tags({"llm2clip.refresh.status": result.status})
        tracker.log_metrics({"new_images": result.new_images_since_last_refresh})
        _write_record(cfg, result)
    return result
