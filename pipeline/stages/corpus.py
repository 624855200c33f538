"""`corpus`: the everyday caption corpus for stage 1, written by the recaption job's text mode.

Seeds (topic x photo style, `pipeline.everyday`) go into caption version `{name}.seed`;
then three text-mode recaption runs, each nested in MLflow: seed -> short caption, short ->
dense rewrite, short -> paraphrase. Their caption versions are recorded in
`{store}/_corpus/{name}.json`, which `finetune_text.pairs: [{corpus: NAME}]` reads to
train on (short, dense) and (short, paraphrase) pairs. Every step is incremental.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from pipeline import everyday
from pipeline.captioning import configured_caption_version
from pipeline.config import PipelineConfig, SamplingConfig, config_to_dict
from pipeline.plans import StagePlan
from pipeline.stages import tracking
from pipeline.stages.ingest import caption_rows
from pipeline.stages.recaption import run_recaption
from pipeline.store import Store, put_atomically, resolve_filesystem, utc_now
from schemas import STORE_SCHEMAS

ROLES = {  # role -> (source role, prompt, max_tokens)
    "short": ("seed", everyday.SHORT_PROMPT, 40),
    "dense": ("short", everyday.DENSE_PROMPT, 160),
    "paraphrase": ("short", everyday.PARAPHRASE_PROMPT, 48),
}


@dataclass
class CorpusResult:
    name: str
    items: int
    versions: dict[str, str] = field(default_factory=dict)
    steps: dict[str, Any] = field(default_factory=dict)
    mlflow_url: str | None = None

    def summary(self) -> dict[str, Any]:
        return {"stage": "corpus", "corpus": self.name, "items": self.items, "caption versions": self.versions,
                "steps": self.steps, "mlflow run": self.mlflow_url}


def _record_path(cfg: PipelineConfig, name: str) -> tuple[Any, str]:
    fs, root = resolve_filesystem(cfg.store.uri)
    return fs, f"{root.rstrip('/')}/_corpus/{name}.json"


def corpus_versions(cfg: PipelineConfig, name: str) -> dict[str, str]:
    """{'seed'|'short'|'dense'|'paraphrase': caption version} of a built corpus."""
    fs, path = _record_path(cfg, name)
    try:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read())["versions"]
    except FileNotFoundError:
        raise ValueError(f"corpus {name!r} has not been built in {cfg.store.uri}: run python -m jobs.corpus first") from None


def corpus_steps(cfg: PipelineConfig) -> list[tuple[str, PipelineConfig]]:
    """(role, the recaption config that writes it) in order; each reads the one before it."""
    cc = cfg.corpus
    versions = {"seed": f"{cc.name}.seed"}
    steps = []
    for role, (source, prompt, max_tokens) in ROLES.items():
        sampling = SamplingConfig(max_tokens=max_tokens, temperature=cc.temperature, seed=cc.seed)
        recaption = cfg.recaption.model_copy(update={
            "mode": "text", "model": cc.model, "dataset": cc.name, "text_source": versions[source],
            "prompt": prompt, "source": "paraphrase" if role == "paraphrase" else ("original" if role == "short" else "dense"),
            "sampling": sampling, "limit_images": None,
        })
        step_cfg = cfg.model_copy(update={"recaption": recaption})
        versions[role] = configured_caption_version(step_cfg)
        steps.append((role, step_cfg))
    return steps


def plan_corpus(cfg: PipelineConfig) -> StagePlan:
    """Skipped when the corpus record names the versions this config writes, for as many items,
    or when fine-tuning does not read it."""
    cc = cfg.corpus
    if not any(p.corpus == cc.name for p in cfg.finetune_text.pairs):
        return StagePlan("corpus", cc.name, True, f"not used: no finetune_text.pairs entry names corpus {cc.name}")
    wanted = {"seed": f"{cc.name}.seed"} | {role: configured_caption_version(c) for role, c in corpus_steps(cfg)}
    fs, path = _record_path(cfg, cc.name)
    try:
        with fs.open_input_stream(path) as f:
            record = json.loads(f.read())
    except FileNotFoundError:
        record = {}
    if record.get("versions") == wanted and record.get("items") == cc.num_items:
        return StagePlan("corpus", cc.name, True, f"corpus {cc.name} built: {cc.num_items} items, {len(wanted)} caption versions")
    return StagePlan("corpus", cc.name, False, f"corpus {cc.name} {'differs from this config' if record else 'not built yet'}")


def run_corpus(cfg: PipelineConfig, tracker: tracking.Tracker) -> CorpusResult:
    cc = cfg.corpus
    seed_version = f"{cc.name}.seed"
    items = everyday.seeds(cc.num_items, cc.seed)
    captions = Store(cfg.store.uri, "captions")
    rows = [r for item, text in items for r in caption_rows(item, [text], seed_version, "seed", utc_now())]
    captions.append(seed_version, pa.Table.from_pylist(rows, schema=STORE_SCHEMAS["captions"]),
                    {"stage": "corpus", "corpus": cc.name, "seed": cc.seed, "mlflow_run_id": tracker.run_id})
    result = CorpusResult(name=cc.name, items=len(items), versions={"seed": seed_version})
    child_mlflow = cfg.mlflow.model_copy(update={"parent_run_id": tracker.run_id}) if tracker.enabled else cfg.mlflow
    for role, step_cfg in corpus_steps(cfg):
        with tracking.start_run(child_mlflow, "recaption", config_to_dict(step_cfg), run_name=f"corpus/{role}") as child:
            out = run_recaption(step_cfg, child)
        result.versions[role] = out.caption_version
        result.steps[role] = {"captioned": out.captioned, "skipped": out.skipped, "rejected": out.rejected,
                              "caption_version": out.caption_version}
    fs, path = _record_path(cfg, cc.name)
    put_atomically(fs, path, json.dumps({"name": cc.name, "items": len(items), "versions": result.versions, "mlflow_run_id": tracker.run_id}))
    tracker.set_tags({f"llm2clip.output.corpus.{k}": v for k, v in result.versions.items()})
    tracker.log_dict(result.summary(), "corpus/summary.json")
    result.mlflow_url = tracker.url
    return result
