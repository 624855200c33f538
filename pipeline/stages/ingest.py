"""`ingest`: images + original captions -> image manifest, caption store, rejects.

The source is the embedded default (rendered to `{storage}/datasets`, where every node reads
it), a folder or prefix, a listing, or one image: a local path or a URI (s3://, gs://, file://);
or WebDataset shards (a brace pattern, a .tar, a folder or prefix of them: img2dataset's output).
`listing_ingest.ingest_listing` and `shard_ingest.ingest_shards` read and check every new image
in Ray Data and commit the stores. Re-ingesting the same listing adds nothing and opens no image; every input row ends as
added, skipped or rejected.
"""

from __future__ import annotations

from pipeline import shards, uri
from pipeline.config import PipelineConfig
from pipeline.embedded import LISTING_NAME, dataset_dir, write_embedded_dataset
from pipeline.lineage import ListingInput
from pipeline.plans import StagePlan
from pipeline.stages.ingest_writer import IngestResult
from pipeline.stages.listing_ingest import ingest_listing, listing_sha256
from pipeline.stages.shard_ingest import ingest_shards
from pipeline.stages.tracking import Tracker
from pipeline.store import Store


def resolve_source(cfg: PipelineConfig, render: bool = True) -> str:
    """The listing to ingest: the embedded dataset's on storage (rendered first unless
    `render` is False), or what the user gave."""
    if cfg.ingest.source == "embedded":
        root = uri.join(cfg.storage, "datasets")
        if not render:
            return uri.join(dataset_dir(root, cfg.embedded), LISTING_NAME)
        return write_embedded_dataset(root, cfg.embedded, scratch=uri.join(cfg.run_dir, "datasets"))
    return cfg.ingest.source if shards.is_pattern(cfg.ingest.source) else uri.absolute(cfg.ingest.source)


def plan_ingest(cfg: PipelineConfig) -> StagePlan:
    """Skipped when the manifest version already holds a commit of this very listing (same
    bytes); a folder source is listed anew each time (its new images are the point; the
    images it had are skipped unopened)."""
    dataset = cfg.ingest.dataset
    listing = resolve_source(cfg, render=False)  # a plan writes nothing
    if cfg.ingest.source == "embedded" and not uri.exists(listing):
        return StagePlan("ingest", dataset, False, f"the embedded dataset is not rendered yet ({uri.parent(listing)})")
    sha = listing_sha256(listing)
    commits = Store(cfg.store.uri, "manifest").commits(dataset)
    if sha and any(isinstance(i, ListingInput) and i.sha256 == sha for c in commits for i in c.lineage.inputs):
        return StagePlan("ingest", dataset, True, f"manifest {dataset} already holds listing {uri.name(listing)} (sha256 {sha[:12]})")
    why = "a folder or shard source is listed each run (what it had is skipped unopened)" if sha is None else f"listing {uri.name(listing)} not ingested yet"
    return StagePlan("ingest", dataset, False, why)


def run_ingest(cfg: PipelineConfig, tracker: Tracker) -> IngestResult:
    source = resolve_source(cfg)
    ingest = ingest_shards if cfg.ingest.source != "embedded" and shards.is_shard_source(source) else ingest_listing
    result = ingest(cfg.store.uri, cfg.ingest, source, tracker.run_id)
    result.tracked_by(tracker)
    tracker.log_metrics({"input_rows": result.input_rows, "added": result.added, "skipped": result.skipped, "rejected": result.rejected,
                         "captions_added": result.captions_added, "opened": result.opened, "shards": result.shards,
                         "shards_skipped": result.shards_skipped} | {f"rejected.{k}": v for k, v in result.reject_reasons.items()})
    tracker.set_tags({"llm2clip.output.manifest": result.dataset, "llm2clip.store_uri": cfg.store.uri,
                      **{f"llm2clip.commit.{k}": v for k, v in result.commits.items() if v}})
    tracker.log_result(result, "ingest")
    return result
