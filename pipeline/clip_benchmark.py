"""The evaluation report as LAION CLIP_benchmark result files (no Ray), so that its users and
DataComp's can merge our runs with theirs (`clip_benchmark build *.json`, or pandas).

CLIP_benchmark (github.com/LAION-AI/CLIP_benchmark) writes one JSON per model, dataset,
language and task, the dict `dump` at the end of `run()` in `clip_benchmark/cli.py`:

    {"dataset": ..., "model": ..., "pretrained": ..., "task": ..., "metrics": {...}, "language": ...}

`ClipBenchmarkResult` is that record, its fields in that order. What goes in it:

* `dataset`: our set's name (`heldout.short`, `coco`, `fashion`): our sets are often subsets
  (`limit`) or held-out splits, so they do not borrow CLIP_benchmark's dataset names.
* `model`: the model's name in our report; `pretrained`: its reference (path or MLflow URI),
  as CLIP_benchmark writes a checkpoint path there. Its `build` joins them into `model_fullname`.
* `task` and `metrics`, from `clip_benchmark/metrics/`:
  - retrieval sets -> `zeroshot_retrieval` (`zeroshot_retrieval.py`):
    `image_retrieval_recall@K` (each text retrieves images: our `t2i_r@K`) and
    `text_retrieval_recall@K` (each image retrieves texts: our `i2t_r@K`), for every K of
    the report; the report always has 1, 5 and 10 (`RECALL_KS`). Both count a query as a hit
    when any of its positives is in its top K. One difference: CLIP_benchmark keeps a caption
    repeated across images once per image, we keep one text whose positives are all of them.
  - zero-shot sets -> `zeroshot_classification` (`zeroshot_classification.py`): `acc1`,
    `acc5` and `mean_per_class_recall`. With fewer than 5 classes CLIP_benchmark writes
    `acc5: NaN`; we leave `acc5` out, which its `build` reads the same (an empty cell) and
    keeps the file strict JSON.
  - CRA sets are left out: CLIP_benchmark has no caption-to-caption task. So are the text
    encoders, which have CRA only.
* `language`: "en", CLIP_benchmark's default: our templates and sets are English.

Layout: `{report}/clip_benchmark/{dataset}__{model}__{task}.json`. A name is kept when it is
made of letters, digits, `.`, `-` and `_`; otherwise those other characters become `_` and
8 hex digits of the name's sha256 are appended (model `clip@current` -> `clip_current-` + hash), so
two names never share a file. The files are written before `results.json`, with the report.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from pipeline.eval_report import EvalReport, SetResult

DIR = "clip_benchmark"
RECALL_KS = (1, 5, 10)  # the recall@K cut-offs every report has (CLIP_benchmark's and DataComp's)
LANGUAGE = "en"

ClipBenchmarkTask = Literal["zeroshot_retrieval", "zeroshot_classification"]


@dataclass(frozen=True)
class ClipBenchmarkResult:
    """One CLIP_benchmark result file; the field order is the order of its keys."""

    dataset: str
    model: str
    pretrained: str
    task: ClipBenchmarkTask
    metrics: dict[str, float]
    language: str = LANGUAGE

    @property
    def file_name(self) -> str:
        return f"{_file_part(self.dataset)}__{_file_part(self.model)}__{self.task}.json"

    def to_json(self) -> dict:
        return asdict(self)


def from_report(report: EvalReport) -> list[ClipBenchmarkResult]:
    """A record per (retrieval or zero-shot set, model scored on it), in the report's order."""
    refs = {m.name: m.ref for m in report.models}
    out = []
    for s in report.sets:
        if s.task == "cra":  # no CLIP_benchmark counterpart
            continue
        for model, scores in s.scores.items():
            task, converted = _convert(s, scores)
            out.append(ClipBenchmarkResult(s.name, model, refs[model], task, converted))
    return out


def _convert(s: SetResult, scores: dict[str, float]) -> tuple[ClipBenchmarkTask, dict[str, float]]:
    if s.task == "retrieval":
        ks = [int(key.removeprefix("i2t_r@")) for key in scores if key.startswith("i2t_r@")]
        metrics = {}
        for k in ks:  # CLIP_benchmark's order: image, then text retrieval, per K
            metrics[f"image_retrieval_recall@{k}"] = scores[f"t2i_r@{k}"]
            metrics[f"text_retrieval_recall@{k}"] = scores[f"i2t_r@{k}"]
        return "zeroshot_retrieval", metrics
    names = {"top1": "acc1", "top5": "acc5", "mean_per_class_recall": "mean_per_class_recall"}
    return "zeroshot_classification", {names[key]: value for key, value in scores.items() if key in names}


def write(results: list[ClipBenchmarkResult], out_dir: str | Path) -> dict[str, Path]:
    """`clip_benchmark/<file_name>` under out_dir for every record; returns {relative name: path}."""
    files = {}
    for result in results:
        path = Path(out_dir) / DIR / result.file_name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result.to_json()))
        files[f"{DIR}/{result.file_name}"] = path
    return files


def _file_part(name: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)
    if safe == name:
        return name
    return f"{safe}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
