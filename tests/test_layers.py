"""The package's layers, read from the source (no imports run): jobs -> stages -> core.

A stage module is a module of `pipeline/stages/` that a job in `jobs/` calls; it is the driver
of one concept. Only the orchestrators (`pipeline`, `refresh`) import other stages: what two
stages share is a core module or a shared piece of `pipeline/stages/` (the trainer, tracking,
the caption pass...), and a shared piece imports no stage either. Core (`pipeline/*.py`)
imports no stage, no Ray and no vLLM (MLflow only in `model_refs`, deferred). See
docs/architecture.md.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STAGES_DIR = REPO / "pipeline" / "stages"
ORCHESTRATORS = {"pipeline", "refresh"}
MAX_STAGE_LINES = 450


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (deferred imports count too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}  # `from pipeline.stages import ingest`
    return out


def stage_modules() -> set[str]:
    """The stage modules: those the jobs call."""
    called = {m.removeprefix("pipeline.stages.") for job in (REPO / "jobs").glob("*.py") for m in _imports(job)
              if m.startswith("pipeline.stages.") and m.count(".") == 2}
    return {m for m in called if (STAGES_DIR / f"{m}.py").is_file()} - {"jobkit"}


def test_the_jobs_call_every_stage():
    assert stage_modules() == {"ingest", "recaption", "embed", "corpus", "finetune_text", "train_clip", "evaluate", "sweep", "refresh",
                               "pipeline", "export", "serve"}


def test_only_the_orchestrators_import_a_stage():
    stages = stage_modules()
    crossing = {}
    for path in STAGES_DIR.glob("*.py"):
        if path.stem in ORCHESTRATORS:
            continue
        imported = {m.removeprefix("pipeline.stages.") for m in _imports(path) if m.startswith("pipeline.stages.")}
        if imported & stages - {path.stem}:
            crossing[path.stem] = sorted(imported & stages - {path.stem})
    assert not crossing, f"stage modules or shared pieces importing a stage (move what they share to core or a shared piece): {crossing}"


def test_core_imports_no_stage_and_no_engine():
    bad = {}
    for path in (REPO / "pipeline").glob("*.py"):
        engines = {m for m in _imports(path) if m.split(".")[0] in ("ray", "vllm") or m.startswith("pipeline.stages")}
        if path.stem != "model_refs":
            engines |= {m for m in _imports(path) if m.split(".")[0] == "mlflow"}
        if engines:
            bad[path.name] = sorted(engines)
    assert not bad, f"core modules importing a stage or an engine: {bad}"


def test_jobs_call_one_stage_through_jobkit():
    for job in (REPO / "jobs").glob("*.py"):
        if job.stem == "__init__":
            continue
        stages = {m for m in _imports(job) if m.startswith("pipeline.stages.") and m.count(".") == 2} - {"pipeline.stages.jobkit"}
        assert "pipeline.stages.jobkit" in _imports(job) and len(stages) == 1, (job.name, stages)


def test_no_stage_module_is_over_450_lines():
    sizes = {m: len((STAGES_DIR / f"{m}.py").read_text().splitlines()) for m in stage_modules()}
    assert max(sizes.values()) <= MAX_STAGE_LINES, {m: n for m, n in sizes.items() if n > MAX_STAGE_LINES}
