"""The evaluation report (no Ray): results -> a Markdown and a JSON table, and plots.

A `SetResult` holds one set's scores for every model, the protocol line that says how they
were computed, and what chance scores. The Markdown has one table per set (a row per
model, a column per metric, chance last, the protocol under it); the JSON holds the same as
one wide table, a row per model and a `set/metric` column per figure. Plots are matplotlib
figures: recall@K curves, CRA per text set (before/after fine-tuning side by side), a
similarity heatmap of a small sample, and confusion matrices of the zero-shot sets.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

Task = Literal["cra", "retrieval", "zero_shot"]


@dataclass(frozen=True)
class ModelRow:
    name: str
    kind: Literal["text_encoder", "minilm", "llm2clip"]
    ref: str
    note: str = ""  # e.g. "baseline", the encoder_version


@dataclass(frozen=True)
class Problem:
    set: str
    item: str  # an image reference
    reason: str
    detail: str = ""


@dataclass
class SetResult:
    name: str
    task: Task
    protocol: str
    chance: dict[str, float]
    scores: dict[str, dict[str, float]] = field(default_factory=dict)  # model -> metric -> value

    @property
    def metrics(self) -> list[str]:
        return list(self.chance)


@dataclass
class Plots:
    """What the figures are drawn from (filled while the metrics are computed)."""

    curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict)  # set -> model -> (i2t, t2i)
    heatmaps: dict[str, tuple[np.ndarray, list[str], list[str]]] = field(default_factory=dict)  # "model @ set" -> sims
    confusions: dict[str, tuple[np.ndarray, list[str]]] = field(default_factory=dict)  # "model @ set" -> counts, classes


@dataclass
class EvalReport:
    models: list[ModelRow]
    sets: list[SetResult]
    problems: list[Problem] = field(default_factory=list)
    plots: Plots = field(default_factory=Plots)

    def value(self, model: str, set_name: str, metric: str) -> float | None:
        for s in self.sets:
            if s.name == set_name:
                return s.scores.get(model, {}).get(metric)
        return None

    # ------------------------------------------------------------ tables
    def wide_table(self) -> dict[str, list]:
        """Column -> values, a row per model: `model`, then `set/metric` for every figure."""
        table: dict[str, list] = {"model": [m.name for m in self.models]}
        for s in self.sets:
            for metric in s.metrics:
                table[f"{s.name}/{metric}"] = [s.scores.get(m.name, {}).get(metric) for m in self.models]
        return table

    def to_json(self) -> dict:
        table = self.wide_table()
        rows = [{k: table[k][i] for k in table} for i in range(len(self.models))]
        return {
            "models": [asdict(m) for m in self.models],
            "rows": rows,
            "chance": {f"{s.name}/{k}": v for s in self.sets for k, v in s.chance.items()},
            "protocols": {s.name: s.protocol for s in self.sets},
            "tasks": {s.name: s.task for s in self.sets},
            "problems": [asdict(p) for p in self.problems],
        }

    def to_markdown(self) -> str:
        lines = ["# Evaluation report", "", "| model | kind | reference | note |", "|---|---|---|---|"]
        lines += [f"| {m.name} | {m.kind} | `{m.ref}` | {m.note} |" for m in self.models]
        for s in self.sets:
            rows = [m.name for m in self.models if m.name in s.scores]
            if not rows:
                continue
            lines += ["", f"## {s.name} ({s.task.replace('_', '-')})", "",
                      "| model | " + " | ".join(s.metrics) + " |", "|---|" + "---|" * len(s.metrics)]
            lines += [f"| {name} | " + " | ".join(_fmt(s.scores[name].get(k)) for k in s.metrics) + " |" for name in rows]
            lines += ["| *chance* | " + " | ".join(_fmt(s.chance[k]) for k in s.metrics) + " |", "", f"Protocol: {s.protocol}"]
        if self.problems:
            counts = Counter((p.set, p.reason) for p in self.problems)
            lines += ["", "## Problems (left out, never fatal)", "", "| set | reason | images |", "|---|---|---|"]
            lines += [f"| {st} | {reason} | {n} |" for (st, reason), n in sorted(counts.items())]
            shown = self.problems[:3]  # the report ends the job's screen: a few examples, all of them in results.json
            lines += ["", f"The first {len(shown)} of {len(self.problems)} (all of them in results.json):", ""]
            lines += [f"- {p.set}: `{p.item}`: {p.reason}{' (' + p.detail + ')' if p.detail else ''}" for p in shown]
        return "\n".join(lines) + "\n"

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        """results.md, results.json and plots/*.png under out_dir; returns {name: path}."""
        out = Path(out_dir)
        (out / "plots").mkdir(parents=True, exist_ok=True)
        files = {"results.md": out / "results.md", "results.json": out / "results.json"}
        files["results.md"].write_text(self.to_markdown())
        for name, fig in self.figures().items():
            path = out / "plots" / f"{name}.png"
            fig.savefig(path, dpi=110, bbox_inches="tight")
            files[f"plots/{name}.png"] = path
            import matplotlib.pyplot as plt

            plt.close(fig)
        # results.json last, moved into place whole: its presence means the report is complete.
        tmp = out / ".tmp-results.json"
        tmp.write_text(json.dumps(self.to_json(), indent=2))
        tmp.replace(files["results.json"])
        return files

    # ------------------------------------------------------------ plots
    def figures(self) -> dict:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figs = {}
        for set_name, by_model in self.plots.curves.items():
            fig, ax = plt.subplots(figsize=(6, 4))
            for model, (i2t, t2i) in by_model.items():
                ks = np.arange(1, len(i2t) + 1)
                line, = ax.plot(ks, i2t, label=f"{model} I2T")
                ax.plot(ks, t2i, linestyle="--", color=line.get_color(), label=f"{model} T2I")
            ax.set(xlabel="K", ylabel="recall@K", title=f"recall@K: {set_name}", ylim=(0, 1.02))
            ax.legend(fontsize=7)
            figs[f"recall_at_k.{set_name}"] = fig
        cra = [s for s in self.sets if s.task == "cra"]
        encoders = [m.name for m in self.models if any(m.name in s.scores for s in cra)]
        if cra and encoders:
            fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(cra)), 4))
            width = 0.8 / len(encoders)
            for i, model in enumerate(encoders):
                ax.bar(np.arange(len(cra)) + i * width, [s.scores.get(model, {}).get("cra", np.nan) for s in cra], width, label=model)
            ax.set_xticks(np.arange(len(cra)) + 0.4 - width / 2, [s.name for s in cra], rotation=20, ha="right")
            ax.set(ylabel="CRA (top-1)", ylim=(0, 1.02), title="CRA per caption-pair set (raw vs fine-tuned encoders, baselines)")
            ax.legend(fontsize=7)
            figs["cra_before_after"] = fig
        for key, (sims, rows, cols) in self.plots.heatmaps.items():
            fig, ax = plt.subplots(figsize=(7, 6))
            im = ax.imshow(sims, cmap="viridis")
            ax.set_yticks(range(len(rows)), rows, fontsize=6)
            ax.set_xticks(range(len(cols)), [c[:40] for c in cols], fontsize=6, rotation=70, ha="right")
            ax.set_title(f"image-text cosine similarity: {key}", fontsize=9)
            fig.colorbar(im, ax=ax)
            figs[f"similarity.{_slug(key)}"] = fig
        for key, (counts, classes) in self.plots.confusions.items():
            fig, ax = plt.subplots(figsize=(6, 5))
            im = ax.imshow(counts, cmap="Blues")
            ax.set_xticks(range(len(classes)), classes, fontsize=7, rotation=60, ha="right")
            ax.set_yticks(range(len(classes)), classes, fontsize=7)
            ax.set(xlabel="predicted", ylabel="true", title=f"zero-shot confusion: {key}")
            fig.colorbar(im, ax=ax)
            figs[f"confusion.{_slug(key)}"] = fig
        return figs


def _fmt(v: float | None) -> str:
    return "" if v is None else f"{v:.4f}"


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text.replace(" @ ", ".")).strip("_")
