"""Every metric of `evaluate` from embeddings (no Ray): one `SetResult` per view with its chance
and protocol line, and the scores of each model, with the figures' data on the report."""

from __future__ import annotations

import numpy as np

from pipeline import metrics
from pipeline.clip_benchmark import RECALL_KS
from pipeline.eval_report import EvalReport, SetResult
from pipeline.eval_views import CraView, RetrievalView, Views, ZeroShotView


def set_results(views: Views, ks: list[int], templates: list[str], template_source: str) -> dict[str, SetResult]:
    """An empty result per view: its task, protocol and chance scores."""
    results = {v.name: cra_result(v) for v in views.cra}
    results |= {v.name: retrieval_result(v, ks) for v in views.retrieval}
    return results | {v.name: zero_shot_result(v, templates, template_source) for v in views.zero_shot}


def cra_result(view: CraView) -> SetResult:
    n = len(view.pairs)
    return SetResult(view.name, "cra", f"{metrics.cra_protocol(n)}; {view.source}", {"cra": 1 / (2 * n - 1)})


def retrieval_ks(ks: list[int]) -> list[int]:
    """The configured recall@K cut-offs and CLIP_benchmark's 1, 5, 10, which its result files need."""
    return sorted(set(ks) | set(RECALL_KS))


def retrieval_result(view: RetrievalView, ks: list[int]) -> SetResult:
    return SetResult(view.name, "retrieval", view.protocol, metrics.retrieval_chance(view.positives, retrieval_ks(ks)))


def zero_shot_result(view: ZeroShotView, templates: list[str], source: str) -> SetResult:
    c = len(view.class_names)
    ks = [k for k in (1, 5) if k <= c]
    line = (f"{len(view.image_ids)} images, {c} classes; a class embedding is the mean of the normalised embeddings of its "
            f"name in {len(templates)} templates ({source}), renormalised; top-k of cosine")
    # a uniformly random guess recalls 1/c of every class
    return SetResult(view.name, "zero_shot", line, {f"top{k}": k / c for k in ks} | {"mean_per_class_recall": 1 / c})


def score_model(model: str, joint: bool, views: Views, results: dict[str, SetResult], report: EvalReport, text_emb: dict[str, np.ndarray],
                image_emb: dict[str, np.ndarray], templates: list[str], ks: list[int], heatmap_size: int) -> None:
    """Every metric of one model from its embeddings (text -> unit row, image_id -> unit row). A
    text encoder (`joint` False) has CRA only; an LLM2CLIP model also retrieval and zero-shot."""
    for view in views.cra:
        first = np.stack([text_emb[a] for a, _ in view.pairs])
        second = np.stack([text_emb[b] for _, b in view.pairs])
        results[view.name].scores[model] = {"cra": metrics.caption_retrieval_accuracy(first, second)}
    if not joint:
        return
    for view in views.retrieval:
        keep = [r for r, i in enumerate(view.image_ids) if i in image_emb]
        if len(keep) < 2:
            continue
        sims = metrics.cosine_similarity(np.stack([image_emb[view.image_ids[r]] for r in keep]), np.stack([text_emb[t] for t in view.texts]))
        positives = view.positives[keep]
        results[view.name].scores[model] = metrics.retrieval_scores(sims, positives, retrieval_ks(ks))
        report.plots.curves.setdefault(view.name, {})[model] = metrics.recall_curve(sims, positives, min(50, sims.shape[1]))
        if view is views.retrieval[0]:
            m = min(heatmap_size, len(keep))
            cols = [int(np.argmax(positives[r])) for r in range(m)]
            report.plots.heatmaps[f"{model} @ {view.name}"] = (
                sims[:m][:, cols], [f"image {r}" for r in range(m)], [view.texts[c] for c in cols])
    for view in views.zero_shot:
        keep = [r for r, i in enumerate(view.image_ids) if i in image_emb]
        if not keep:
            continue
        prompts = np.stack([[text_emb[t.format(c)] for t in templates] for c in view.class_names])
        sims = metrics.cosine_similarity(np.stack([image_emb[view.image_ids[r]] for r in keep]), metrics.class_embeddings(prompts))
        labels = [view.labels[r] for r in keep]
        confusion = metrics.confusion_matrix(sims, labels)
        results[view.name].scores[model] = metrics.zero_shot_scores(sims, labels) | {
            "mean_per_class_recall": metrics.mean_per_class_recall(confusion)}
        report.plots.confusions[f"{model} @ {view.name}"] = (confusion, view.class_names)
