"""`pipeline`: every stage in order as one resumable job, under one MLflow parent run.

    ingest -> recaption -> embed (raw encoder) -> corpus -> finetune-text
           -> embed-finetuned -> train-clip -> evaluate [-> sweep]

Each stage is planned right before it would run (`pipeline.plans`): a stage whose output
exists is skipped, so a re-run after a failure continues where it stopped and re-does
nothing; a training stage that was killed resumes from its checkpoint. Stages hand each
other a typed `Handover` (versions, paths, URIs). The parent run holds the lineage graph,
the stages table and the evaluation's comparison table; each stage that runs has a nested
run, reopened by a re-run of the same pipeline.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from pipeline.config import PIPELINE_STAGES, EvalModel, PipelineConfig, config_to_dict
from pipeline.plans import StagePlan
from pipeline.records import Reported, hidden, label
from pipeline.stages import corpus, embed, evaluate, finetune_text, ingest, recaption, sweep, tracking, train_clip
from pipeline.stages.tracking import Tracker
from pipeline.uri import is_file, join, read_text
from pipeline.versioning import stable_hash

log = logging.getLogger(__name__)


@dataclass
class Handover:
    """What the stages hand each other: versions, paths and URIs, never summary prose."""

    manifest: str | None = None  # ingest: manifest version (the dataset)
    captions: str | None = None  # recaption: caption version
    embeddings: str | None = None  # embed: embedding version of the raw LLM
    corpus: str | None = None  # corpus: its name (its caption versions are in its record)
    encoder_path: str | None = None  # finetune-text: the merged encoder
    encoder_version: str | None = None
    encoder_uri: str | None = None
    finetuned_embeddings: str | None = None  # embed-finetuned: embedding version of the fine-tuned encoder
    model_path: str | None = None  # train-clip: the LLM2CLIP model
    model_uri: str | None = None
    report: str | None = None  # evaluate: the report folder
    best_config: str | None = None  # sweep: the best trial's train-clip config

    def need(self, name: str, stage: str) -> str:
        value = getattr(self, name)
        if not value:
            raise RuntimeError(f"pipeline: {stage} needs the {name} of an earlier stage, which has no output; run without "
                               f"--from (or from an earlier stage)")
        return value


def stage_config(cfg: PipelineConfig, stage: str, h: Handover) -> PipelineConfig:
    """The config a stage runs with: the user's, plus what the earlier stages handed over."""
    def section(name: str, **values: Any) -> dict[str, Any]:
        return {name: getattr(cfg, name).model_copy(update=values)}

    if stage == "embed":  # the raw LLM's embeddings (the baseline's and CRA-before's)
        return cfg.model_copy(update=section("embed", encoder=None))
    if stage == "embed-finetuned":
        return cfg.model_copy(update=section("embed", encoder=h.need("encoder_path", stage)))
    if stage == "train-clip":
        return cfg.model_copy(update=section("train_clip", encoder=h.need("encoder_version", stage)))
    if stage == "evaluate":
        ours = [EvalModel(ref=cfg.models.llm, name="llm (raw)"), EvalModel(ref=h.need("encoder_path", stage), name="llm (fine-tuned)"),
                EvalModel(ref=h.need("model_path", stage), name="llm2clip")]
        mine = {m.ref for m in ours}
        return cfg.model_copy(update=section("evaluate", models=[m for m in cfg.evaluate.models if m.ref not in mine] + ours))
    if stage == "sweep":
        return cfg.model_copy(update=section("sweep", vision_model=h.need("model_path", stage))
                              | section("train_clip", encoder=h.need("encoder_version", stage)))
    return cfg


@dataclass(frozen=True)
class Stage:
    name: str
    job: str  # the job it is on its own (its MLflow stage tag)
    plan: Callable[[PipelineConfig], StagePlan]
    run: Callable[[PipelineConfig, Tracker, StagePlan], Any]  # the plan made right before (a training stage reuses what it resolved)
    hand_over: Callable[[PipelineConfig, StagePlan, Any, Handover], None]  # (cfg, plan, result or None when skipped, handover)


def _unplanned(run: Callable[[PipelineConfig, Tracker], Any]) -> Callable[[PipelineConfig, Tracker, StagePlan], Any]:
    """A stage whose run does not take its plan."""
    return lambda cfg, tracker, plan: run(cfg, tracker)


def _over_ingest(cfg, plan, result, h):
    h.manifest = result.dataset if result else plan.output


def _over_recaption(cfg, plan, result, h):
    h.captions = result.caption_version if result else plan.output


def _over_embed(cfg, plan, result, h):
    h.embeddings = result.encoder_version if result else plan.output


def _over_corpus(cfg, plan, result, h):
    used = any(p.corpus == cfg.corpus.name for p in cfg.finetune_text.pairs)
    h.corpus = result.name if result else (plan.output if used else None)


def _over_finetune(cfg, plan, result, h):
    result = result or plan.done
    h.encoder_path, h.encoder_version = result.encoder_path, result.encoder_version
    h.encoder_uri = result.model_uri


def _over_embed_finetuned(cfg, plan, result, h):
    h.finetuned_embeddings = result.encoder_version if result else plan.output


def _over_train_clip(cfg, plan, result, h):
    result = result or plan.done
    h.model_path, h.model_uri = result.model_path, result.model_uri


def _over_evaluate(cfg, plan, result, h):
    h.report = result.report_dir if result else plan.output


def _over_sweep(cfg, plan, result, h):
    h.best_config = result.best_config_path if result else plan.output


def plan_sweep(cfg: PipelineConfig) -> StagePlan:
    """Skipped when the sweep this config names has written its best config."""
    try:
        name = sweep.sweep_name(cfg)
    except ValueError as e:
        return StagePlan("sweep", "", False, f"inputs not written yet ({str(e).split(';')[0]})")
    best = join(sweep.sweeps_dir(cfg), name, sweep.BEST_CONFIG)
    written = is_file(best)
    return StagePlan("sweep", best, written, "best config written" if written else f"{cfg.sweep.trials} trials")


STAGES = (
    Stage("ingest", "ingest", ingest.plan_ingest, _unplanned(ingest.run_ingest), _over_ingest),
    Stage("recaption", "recaption", recaption.plan_recaption, _unplanned(recaption.run_recaption), _over_recaption),
    Stage("embed", "embed", embed.plan_embed, _unplanned(embed.run_embed), _over_embed),
    Stage("corpus", "corpus", corpus.plan_corpus, _unplanned(corpus.run_corpus), _over_corpus),
    Stage("finetune-text", "finetune_text", finetune_text.plan_finetune_text, finetune_text.run_finetune_text, _over_finetune),
    Stage("embed-finetuned", "embed", lambda c: embed.plan_embed(c, "embed-finetuned"), _unplanned(embed.run_embed),
          _over_embed_finetuned),
    Stage("train-clip", "train_clip", train_clip.plan_train_clip, train_clip.run_train_clip, _over_train_clip),
    Stage("evaluate", "evaluate", evaluate.plan_evaluate, _unplanned(evaluate.run_evaluate), _over_evaluate),
    Stage("sweep", "sweep", plan_sweep, _unplanned(sweep.run_sweep), _over_sweep),
)
assert tuple(s.name for s in STAGES) == PIPELINE_STAGES


def selected(cfg: PipelineConfig) -> list[str]:
    """The stages this run may run, in order (--from / --until, sweep when enabled)."""
    names = [n for n in PIPELINE_STAGES if n != "sweep" or cfg.pipeline.sweep]
    first = names.index(cfg.pipeline.from_stage) if cfg.pipeline.from_stage in names else 0
    last = names.index(cfg.pipeline.until_stage) if cfg.pipeline.until_stage in names else len(names) - 1
    if first > last:
        raise ValueError(f"pipeline.from_stage {cfg.pipeline.from_stage} comes after pipeline.until_stage {cfg.pipeline.until_stage}")
    return names[first : last + 1]


# ----------------------------------------------------------------- the plan (--dry-run)
def plan_pipeline(cfg: PipelineConfig) -> list[tuple[StagePlan, str]]:
    """(plan, action) per stage, as the stores are now: a stage after one that would run is
    planned on today's stores (its inputs change when that one runs, so it says so)."""
    h = Handover()
    chosen = selected(cfg)
    out: list[tuple[StagePlan, str]] = []
    upstream_runs = False
    for stage in STAGES:
        if stage.name == "sweep" and not cfg.pipeline.sweep:
            continue
        try:
            plan = stage.plan(stage_config(cfg, stage.name, h))
        except RuntimeError as e:  # a hand-over an earlier stage has not made yet
            plan = StagePlan(stage.name, "", False, f"inputs not written yet ({str(e).split(',')[0].removeprefix('pipeline: ')})")
        if stage.name not in chosen:
            action = "-"
            plan = StagePlan(plan.stage, plan.output, plan.exists, f"not selected (--from/--until); {plan.reason}")
        elif plan.exists and not upstream_runs:
            action = "skip"
        else:
            action = "run"
            if plan.exists:  # its inputs are about to change
                plan = StagePlan(plan.stage, plan.output, plan.exists, f"an earlier stage runs first; now: {plan.reason}")
            upstream_runs = True
        if plan.exists:
            try:
                stage.hand_over(stage_config(cfg, stage.name, h), plan, None, h)
            except (ValueError, RuntimeError, TypeError, AttributeError):
                pass
        out.append((plan, action))
    return out


def print_plan(cfg: PipelineConfig) -> int:
    print(f"{'stage':<16} {'do':<5} {'output':<44} why")
    for plan, action in plan_pipeline(cfg):
        print(plan.line(action))
    return 0


# ----------------------------------------------------------------- the run
@dataclass
class StageRecord:
    stage: str
    action: str  # ran | skipped | not selected
    output: str
    reason: str
    seconds: float = 0.0
    mlflow_run_id: str | None = None


@dataclass
class PipelineResult(Reported):
    stages: list[StageRecord] = hidden(default_factory=list)
    handover: Handover = label("outputs", default_factory=Handover)
    seconds: float = 0.0

    def notes(self) -> dict[str, dict[str, str]]:
        return {"stages": {r.stage: f"{r.action} in {r.seconds:.0f}s: {r.output}" if r.action == "ran" else f"{r.action}: {r.output}"
                           for r in self.stages}}


def pipeline_key(cfg: PipelineConfig) -> str:
    """The pipeline's identity: its config without what only selects stages or places the run
    (and `export`, a job the pipeline does not run). A re-run of the same pipeline reopens its
    MLflow parent run and its stages' runs."""
    config = {k: v for k, v in config_to_dict(cfg).items() if k not in ("pipeline", "ray", "mlflow", "export")}
    return "pipeline-" + stable_hash(config, 12)


def run_pipeline(cfg: PipelineConfig, tracker: Tracker) -> PipelineResult:
    from pipeline.faults import crash_point

    start = time.perf_counter()
    result = PipelineResult()
    result.tracked_by(tracker)
    h, chosen, key = result.handover, selected(cfg), pipeline_key(cfg)
    child_mlflow = cfg.mlflow.model_copy(update={"parent_run_id": tracker.run_id}) if tracker.enabled else cfg.mlflow
    tracker.set_tags({"llm2clip.pipeline": key})
    for stage in STAGES:
        if stage.name == "sweep" and not cfg.pipeline.sweep:
            continue
        stage_cfg = stage_config(cfg, stage.name, h)
        plan = stage.plan(stage_cfg)
        if stage.name not in chosen or plan.exists:
            action = "skipped" if stage.name in chosen else "not selected"
            log.info("pipeline: %s %s: %s", stage.name, action, plan.reason)
            if plan.exists:
                stage.hand_over(stage_cfg, plan, None, h)
            elif stage.name in PIPELINE_STAGES[: PIPELINE_STAGES.index(chosen[0])]:
                log.warning("pipeline: %s (before --from) has no output: %s", stage.name, plan.reason)
            result.stages.append(StageRecord(stage.name, action, plan.shown_output, plan.reason))
        else:
            log.info("pipeline: %s runs: %s", stage.name, plan.reason)
            began = time.perf_counter()
            with tracking.start_run(child_mlflow, stage.job, config_to_dict(stage_cfg), run_name=stage.name,
                                    run_key=f"{key}/{stage.name}") as child:
                out = stage.run(stage_cfg, child, plan)
                child.log_metrics({"wall_seconds": time.perf_counter() - began})
            stage.hand_over(stage_cfg, plan, out, h)
            if stage.name == "evaluate":
                result.report_markdown = read_text(join(h.report, "results.md"))
            record = StageRecord(stage.name, "ran", _output_of(stage.name, h) or plan.shown_output, plan.reason,
                                 time.perf_counter() - began, child.run_id)
            result.stages.append(record)
            tracker.log_metrics({f"seconds.{stage.name}": record.seconds})
        _log_lineage(tracker, cfg, result)
        crash_point(f"pipeline.after.{stage.name}")
        if stage.name == chosen[-1]:
            break
    if h.report and result.report_markdown is None and is_file(join(h.report, "results.md")):
        result.report_markdown = read_text(join(h.report, "results.md"))
    if h.report and is_file(join(h.report, evaluate.DONE_FILE)):
        rows = json.loads(read_text(join(h.report, evaluate.DONE_FILE)))["rows"]
        if rows:
            # MLflow's table viewer reads a dot in a column name as a path into the row: cells stay empty
            tracker.log_table({k.replace(".", " "): [r.get(k) for r in rows] for k in rows[0]}, "comparison.json")
    result.seconds = round(time.perf_counter() - start, 1)
    _log_lineage(tracker, cfg, result)
    return result


def _output_of(stage: str, h: Handover) -> str | None:
    return {"ingest": h.manifest, "recaption": h.captions, "embed": h.embeddings, "corpus": h.corpus,
            "finetune-text": h.encoder_version, "embed-finetuned": h.finetuned_embeddings, "train-clip": h.model_path,
            "evaluate": h.report, "sweep": h.best_config}[stage]


def lineage_graph(cfg: PipelineConfig, h: Handover) -> dict[str, Any]:
    """Which manifest, caption versions, encoder, embeddings and model produced what."""
    nodes, edges = {}, []

    def node(kind: str, ref: str | None) -> str | None:
        if not ref:
            return None
        nodes[f"{kind}:{ref}"] = {"kind": kind, "ref": ref}
        return f"{kind}:{ref}"

    def edge(src: str | None, dst: str | None, stage: str) -> None:
        if src and dst:
            edges.append({"from": src, "to": dst, "stage": stage})

    manifest = node("manifest", h.manifest)
    # ingest writes the listing's own captions; recaption and embed read the configured versions
    for version in ("original", "provided"):
        edge(manifest, node("captions", version) if h.manifest else None, "ingest")
    edge(node("captions", cfg.recaption.text_source) if h.captions else None, node("captions", h.captions), "recaption")
    llm = node("model", cfg.models.llm)
    read = [node("captions", v) for v in cfg.embed.caption_versions] if h.embeddings else []
    raw = node("embeddings", h.embeddings)
    for src in [llm, *read]:
        edge(src, raw, "embed")
    corpus_node = node("corpus", h.corpus)
    encoder = node("encoder", h.encoder_version and f"{h.encoder_version} ({h.encoder_uri or h.encoder_path})")
    for src in (llm, corpus_node, *read):
        edge(src, encoder, "finetune-text")
    tuned = node("embeddings", h.finetuned_embeddings)
    for src in (encoder, *read):
        edge(src, tuned, "embed-finetuned")
    model = node("llm2clip", h.model_uri or h.model_path)
    for src in (manifest, tuned, *read):
        edge(src, model, "train-clip")
    report = node("report", h.report)
    for src in (llm, encoder, model):
        edge(src, report, "evaluate")
    return {"nodes": list(nodes.values()), "edges": edges, "handover": asdict(h)}


def _log_lineage(tracker: Tracker, cfg: PipelineConfig, result: PipelineResult) -> None:
    tracker.log_dict(lineage_graph(cfg, result.handover), "lineage.json")
    tracker.log_dict([asdict(r) for r in result.stages], "stages.json")
    tracker.log_table({"stage": [r.stage for r in result.stages], "action": [r.action for r in result.stages],
                       "seconds": [round(r.seconds, 1) for r in result.stages], "output": [r.output for r in result.stages],
                       "why": [r.reason for r in result.stages]}, "stages_table.json")
    tracker.set_tags({f"llm2clip.output.{k}": v for k, v in asdict(result.handover).items() if v})
