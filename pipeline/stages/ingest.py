"""`ingest`: images + original captions -> image manifest, caption store, rejects.

The source is the embedded default (rendered into `{run_dir}/datasets`), a folder, or a
listing; `listing_ingest.ingest_listing` reads and checks every image in Ray Data and commits
the stores. Re-ingesting the same listing adds nothing; every input row ends as added, skipped
or rejected.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import PipelineConfig
from pipeline.embedded import write_embedded_dataset
from pipeline.lineage import ListingInput
from pipeline.plans import StagePlan
from pipeline.stages.listing_ingest import IngestResult, ingest_listing, listing_sha256
from pipeline.stages.tracking import Tracker
from pipeline.store import Store


def resolve_source(cfg: PipelineConfig) -> str:
    """The listing to ingest: the rendered embedded dataset, or what the user gave."""
    if cfg.ingest.source == "embedded":
        return str(write_embedded_dataset(Path(cfg.run_dir) / "datasets", cfg.embedded))
    return cfg.ingest.source


def plan_ingest(cfg: PipelineConfig) -> StagePlan:
    """Skipped when the manifest version already holds a commit of this very listing (same
    bytes); a folder source is listed anew each time (its new images are the point)."""
    dataset = cfg.ingest.dataset
    listing = resolve_source(cfg)
    sha = listing_sha256(listing)
    commits = Store(cfg.store.uri, "manifest").commits(dataset)
    if sha and any(isinstance(i, ListingInput) and i.sha256 == sha for c in commits for i in c.lineage.inputs):
        return StagePlan("ingest", dataset, True, f"manifest {dataset} already holds listing {Path(listing).name} (sha256 {sha[:12]})")
    why = "a folder source is listed each run" if sha is None else f"listing {Path(listing).name} not ingested yet"
    return StagePlan("ingest", dataset, False, why)


def run_ingest(cfg: PipelineConfig, tracker: Tracker) -> IngestResult:
    result = ingest_listing(cfg.store.uri, cfg.ingest, resolve_source(cfg), tracker.run_id)
    result.tracked_by(tracker)
    tracker.log_metrics({"input_rows": result.input_rows, "added": result.added, "skipped": result.skipped, "rejected": result.rejected,
                         "captions_added": result.captions_added} | {f"rejected.{k}": v for k, v in result.reject_reasons.items()})
    tracker.set_tags({"llm2clip.output.manifest": result.dataset, "llm2clip.store_uri": cfg.store.uri,
                      **{f"llm2clip.commit.{k}": v for k, v in result.commits.items() if v}})
    tracker.log_result(result, "ingest")
    return result
