"""`recaption`: an image-manifest version -> a caption-store version of dense captions.

One caption pass (`pipeline.stages.caption_pass`) with the config's model, mode and prompt:
image mode captions the images with a vision-language model, text mode has an instruction
LLM expand each image's alt-text. The caption version names the model, prompt, sampling and
clean-up rules; a re-run with the same version captions only the images that lack it.
"""

from __future__ import annotations

from pipeline.captioning import caption_version, recaption_model
from pipeline.config import PipelineConfig
from pipeline.plans import StagePlan
from pipeline.stages.caption_pass import RecaptionResult, caption_pass, select_images
from pipeline.stages.tracking import Tracker
from pipeline.store import Store


def plan_recaption(cfg: PipelineConfig, stage: str = "recaption") -> StagePlan:
    """Skipped when every item of its dataset (or text source) has the caption version, or was
    rejected before; the version itself comes from the config and the model's fingerprint."""
    version = caption_version(cfg.recaption, recaption_model(cfg))
    dataset = cfg.recaption.dataset or cfg.ingest.dataset
    manifest = Store(cfg.store.uri, "manifest")
    if cfg.recaption.mode == "image" and not manifest.commits(dataset):
        return StagePlan(stage, version, False, f"inputs not written yet (manifest {dataset})")
    if cfg.recaption.mode == "text" and not Store(cfg.store.uri, "captions").commits(cfg.recaption.text_source):
        return StagePlan(stage, version, False, f"inputs not written yet (captions {cfg.recaption.text_source})")
    todo, items, skipped, rejected_before = select_images(cfg, version)
    if todo.num_rows == 0 and items:
        return StagePlan(stage, version, True, f"all {items} items of {dataset} done ({rejected_before} rejected before)")
    return StagePlan(stage, version, False, f"{todo.num_rows} of {items} items of {dataset} to caption")


def run_recaption(cfg: PipelineConfig, tracker: Tracker) -> RecaptionResult:
    """One caption pass, tracked in the job's MLflow run."""
    return caption_pass(cfg, tracker)
