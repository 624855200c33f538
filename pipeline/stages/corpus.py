"""`corpus`: the everyday caption corpus for stage 1, written by text-mode caption passes.

Seeds (topic x photo style, `pipeline.everyday`) go into caption version `{name}.seed`;
then three text-mode caption passes (`pipeline.stages.caption_pass`), each nested in MLflow:
seed -> short caption, short -> dense rewrite, short -> paraphrase. Their caption versions
are recorded in the corpus record (`pipeline.corpus_record`), which
`finetune_text.pairs: [{corpus: NAME}]` reads to train on (short, dense) and (short,
paraphrase) pairs. Every step is incremental.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa

from pipeline import everyday
from pipeline.captioning import configured_caption_version
from pipeline.captions import caption_rows
from pipeline.config import PipelineConfig, SamplingConfig, config_to_dict
from pipeline.corpus_record import CorpusRecord, CorpusVersions, read_corpus, write_corpus
from pipeline.lineage import Lineage
from pipeline.plans import StagePlan
from pipeline.records import Tracked, label
from pipeline.stages import tracking
from pipeline.stages.caption_pass import RecaptionResult, caption_pass
from pipeline.store import Store, utc_now
from schemas import STORE_SCHEMAS

ROLES = {  # role -> (source role, prompt, max_tokens)
    "short": ("seed", everyday.SHORT_PROMPT, 40),
    "dense": ("short", everyday.DENSE_PROMPT, 160),
    "paraphrase": ("short", everyday.PARAPHRASE_PROMPT, 48),
}


@dataclass
class CorpusResult(Tracked):
    name: str = label("corpus")
    items: int
    versions: CorpusVersions | None = label("caption versions", default=None)
    steps: dict[str, RecaptionResult] = field(default_factory=dict)  # role -> its caption pass


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
    wanted = CorpusVersions(seed=f"{cc.name}.seed", **{role: configured_caption_version(c) for role, c in corpus_steps(cfg)})
    record = read_corpus(cfg.store.uri, cc.name)
    if record and record.versions == wanted and record.items == cc.num_items:
        return StagePlan("corpus", cc.name, True, f"corpus {cc.name} built: {cc.num_items} items, 4 caption versions")
    return StagePlan("corpus", cc.name, False, f"corpus {cc.name} {'differs from this config' if record else 'not built yet'}")


def run_corpus(cfg: PipelineConfig, tracker: tracking.Tracker) -> CorpusResult:
    cc = cfg.corpus
    seed_version = f"{cc.name}.seed"
    items = everyday.seeds(cc.num_items, cc.seed)
    rows = [r for item, text in items for r in caption_rows(item, [text], seed_version, "seed", utc_now())]
    Store(cfg.store.uri, "captions").append(seed_version, pa.Table.from_pylist(rows, schema=STORE_SCHEMAS["captions"]),
                                            Lineage(stage="corpus", corpus=cc.name, seed=cc.seed, mlflow_run_id=tracker.run_id))
    result = CorpusResult(name=cc.name, items=len(items))
    result.tracked_by(tracker)
    child_mlflow = cfg.mlflow.model_copy(update={"parent_run_id": tracker.run_id}) if tracker.enabled else cfg.mlflow
    for role, step_cfg in corpus_steps(cfg):
        with tracking.start_run(child_mlflow, "recaption", config_to_dict(step_cfg), run_name=f"corpus/{role}") as child:
            result.steps[role] = caption_pass(step_cfg, child)
    result.versions = CorpusVersions(seed=seed_version, **{role: step.caption_version for role, step in result.steps.items()})
    write_corpus(cfg.store.uri, CorpusRecord(cc.name, len(items), result.versions, tracker.run_id))
    tracker.set_tags({f"llm2clip.output.corpus.{role}": getattr(result.versions, role) for role in ("seed", *ROLES)})
    tracker.log_result(result, "corpus")
    return result
