"""What a sweep leaves for people: one row per trial, a parallel-coordinates plot of the
sweep, and the best trial's recipe as a config file `jobs.train_clip` takes as it is.
Pure: no Ray, no MLflow."""

from __future__ import annotations

import math
import shlex
from dataclasses import dataclass
from typing import Any

import yaml

from pipeline.config import apply_overrides


@dataclass(frozen=True)
class TrialRow:
    """One trial as the sweep ended it."""

    trial_id: str
    params: dict[str, Any]  # dotted key -> value drawn
    metric: float | None  # the sweep's metric at the trial's last report (None: it never reported)
    epochs: int  # reports = epochs trained
    status: str  # finished | stopped_early | errored
    mlflow_run_id: str | None = None


def trials_table(rows: list[TrialRow], metric: str) -> dict[str, list]:
    """Column -> values (MLflow's `log_table`), best trial first."""
    ordered = sorted(rows, key=lambda r: -math.inf if r.metric is None else r.metric, reverse=True)
    keys = sorted({k for r in rows for k in r.params})
    table: dict[str, list] = {"trial": [r.trial_id for r in ordered], metric: [r.metric for r in ordered],
                              "epochs": [r.epochs for r in ordered], "status": [r.status for r in ordered]}
    for k in keys:
        table[k] = [r.params.get(k) for r in ordered]
    return table


def _axis(values: list[Any]) -> tuple[list[float], list[str] | None, bool]:
    """Values -> positions in [0, 1] (log scale for positive ranges spanning 10x or more), and
    tick labels for categorical axes."""
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        lo, hi = min(values), max(values)
        log = lo > 0 and hi / lo >= 10
        f = (lambda v: math.log(v)) if log else float
        span = f(hi) - f(lo)
        return [(f(v) - f(lo)) / span if span else 0.5 for v in values], None, log
    labels = sorted({str(v) for v in values})
    return [labels.index(str(v)) / max(1, len(labels) - 1) for v in values], labels, False


def parallel_coordinates(rows: list[TrialRow], metric: str, title: str = ""):
    """A matplotlib Figure: one axis per hyperparameter and one for the metric; one line per
    trial that reported, coloured by its metric (stopped-early trials dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r.metric is not None]
    keys = sorted({k for r in done for k in r.params})
    axes_names = keys + [metric]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.8 * len(axes_names)), 4.5))
    if not done:
        ax.text(0.5, 0.5, "no trial reported a result", ha="center")
        return fig
    columns = {k: _axis([r.params.get(k) for r in done]) for k in keys}
    columns[metric] = _axis([r.metric for r in done])
    metrics = [r.metric for r in done]
    lo, hi = min(metrics), max(metrics)
    cmap = plt.get_cmap("viridis")
    for i, row in enumerate(done):
        ys = [columns[k][0][i] for k in axes_names]
        colour = cmap((row.metric - lo) / (hi - lo) if hi > lo else 1.0)
        ax.plot(range(len(axes_names)), ys, color=colour, alpha=0.85, linestyle="--" if row.status == "stopped_early" else "-",
                linewidth=2.2 if row.metric == hi else 1.2)
    for x, k in enumerate(axes_names):
        ax.axvline(x, color="grey", linewidth=0.8)
        values = [r.metric for r in done] if k == metric else [r.params.get(k) for r in done]
        _, labels, log = columns[k]
        if labels is not None:
            for j, label in enumerate(labels):
                ax.text(x + 0.03, j / max(1, len(labels) - 1), label, fontsize=7, va="center")
        else:
            ax.text(x + 0.03, 0.0, f"{min(values):.3g}", fontsize=7, va="bottom")
            ax.text(x + 0.03, 1.0, f"{max(values):.3g}", fontsize=7, va="top")
    ax.set_xticks(range(len(axes_names)), [k.removeprefix("train_clip.") + (" (log)" if columns[k][2] else "") for k in axes_names],
                  rotation=20, fontsize=8)
    ax.set_yticks([])
    ax.set_xlim(-0.2, len(axes_names) - 0.6)
    ax.set_title(title or f"sweep: {len(done)} trials (dashed: stopped early; colour: {metric})", fontsize=10)
    fig.tight_layout()
    return fig


def best_config_yaml(resolved: dict[str, Any], best: TrialRow, metric: str, sweep_name: str) -> str:
    """The sweep's base config with the best trial's values: a file `jobs.train_clip --config`
    takes as it is (paths are the resolved ones of the sweep's run)."""
    data = apply_overrides({k: v for k, v in resolved.items() if k != "sweep"}, list(best.params.items()))
    sets = " ".join(f"--set {shlex.quote(f'{k}={v}')}" for k, v in best.params.items())
    header = (f"# Best trial {best.trial_id} of sweep {sweep_name}: {metric} = {best.metric:.4f} after {best.epochs} epochs.\n"
              f"# Train it: python -m jobs.train_clip --config THIS_FILE\n"
              f"# or on the sweep's own config: python -m jobs.train_clip --config CONFIG {sets}\n")
    return header + yaml.safe_dump(data, sort_keys=False)
