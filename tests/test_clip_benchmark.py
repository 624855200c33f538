"""Our report as CLIP_benchmark result files (no Ray): the keys of `dump` in CLIP_benchmark's
clip_benchmark/cli.py, the metric names of its metrics/zeroshot_retrieval.py and
metrics/zeroshot_classification.py, and the values of our report, from hand-built reports and
from embeddings scored by `eval_scoring`."""

import json

import numpy as np
import pytest

from pipeline import clip_benchmark
from pipeline.clip_benchmark import ClipBenchmarkResult
from pipeline.eval_report import EvalReport, ModelRow, SetResult
from pipeline.eval_scoring import score_model, set_results
from pipeline.eval_views import RetrievalView, Views, ZeroShotView

KEYS = ["dataset", "model", "pretrained", "task", "metrics", "language"]  # cli.py's dump, in its order


def _report() -> EvalReport:
    recalls = {"i2t_r@1": 0.25, "t2i_r@1": 0.5, "i2t_r@5": 0.625, "t2i_r@5": 0.75, "i2t_r@10": 0.875, "t2i_r@10": 1.0}
    return EvalReport(
        [ModelRow("enc", "text_encoder", "/m/enc"), ModelRow("clip-a", "llm2clip", "/m/a"),
         ModelRow("llm2clip-model@current", "llm2clip", "models:/llm2clip-model@current")],
        [SetResult("everyday-pairs", "cra", "CRA", {"cra": 0.01}, {"enc": {"cra": 0.5}, "clip-a": {"cra": 0.125}}),
         SetResult("coco", "retrieval", "R@K", {k: 0.1 for k in recalls},
                   {"clip-a": recalls, "llm2clip-model@current": {k: v / 2 for k, v in recalls.items()}}),
         SetResult("fm", "zero_shot", "10 classes", {"top1": 0.1, "top5": 0.5, "mean_per_class_recall": 0.1},
                   {"clip-a": {"top1": 0.3125, "top5": 0.75, "mean_per_class_recall": 0.28125}}),
         SetResult("tree", "zero_shot", "2 classes", {"top1": 0.5, "mean_per_class_recall": 0.5},
                   {"clip-a": {"top1": 0.8, "mean_per_class_recall": 0.75}})])


def test_report_becomes_one_record_per_scored_model_and_set():
    records = clip_benchmark.from_report(_report())
    # CRA (everyday-pairs) has no CLIP_benchmark task and the text encoder only CRA: neither appears
    assert records == [
        ClipBenchmarkResult("coco", "clip-a", "/m/a", "zeroshot_retrieval", {
            "image_retrieval_recall@1": 0.5, "text_retrieval_recall@1": 0.25,  # image retrieval: texts query images (t2i)
            "image_retrieval_recall@5": 0.75, "text_retrieval_recall@5": 0.625,
            "image_retrieval_recall@10": 1.0, "text_retrieval_recall@10": 0.875}),
        ClipBenchmarkResult("coco", "llm2clip-model@current", "models:/llm2clip-model@current", "zeroshot_retrieval", {
            "image_retrieval_recall@1": 0.25, "text_retrieval_recall@1": 0.125,
            "image_retrieval_recall@5": 0.375, "text_retrieval_recall@5": 0.3125,
            "image_retrieval_recall@10": 0.5, "text_retrieval_recall@10": 0.4375}),
        ClipBenchmarkResult("fm", "clip-a", "/m/a", "zeroshot_classification",
                            {"acc1": 0.3125, "acc5": 0.75, "mean_per_class_recall": 0.28125}),
        ClipBenchmarkResult("tree", "clip-a", "/m/a", "zeroshot_classification", {"acc1": 0.8, "mean_per_class_recall": 0.75}),
    ]
    assert all(r.language == "en" for r in records)
    assert list(records[0].metrics) == ["image_retrieval_recall@1", "text_retrieval_recall@1", "image_retrieval_recall@5",
                                        "text_retrieval_recall@5", "image_retrieval_recall@10", "text_retrieval_recall@10"]


def test_files_are_strict_json_in_clip_benchmarks_key_order(tmp_path):
    files = clip_benchmark.write(clip_benchmark.from_report(_report()), tmp_path)
    names = sorted(files)
    assert names[0] == "clip_benchmark/coco__clip-a__zeroshot_retrieval.json"
    # '@' is no file-name character: replaced, and the name's hash keeps it apart from 'llm2clip-model_current'
    odd = [n for n in names if "llm2clip-model" in n]
    assert len(odd) == 1 and odd[0].startswith("clip_benchmark/coco__llm2clip-model_current-") and odd[0].endswith("__zeroshot_retrieval.json")
    assert sorted(p.name for p in (tmp_path / "clip_benchmark").iterdir()) == [n.removeprefix("clip_benchmark/") for n in names]

    def no_nan(constant):
        raise ValueError(f"not strict JSON: {constant}")

    for name, path in files.items():
        data = json.loads(path.read_text(), parse_constant=no_nan)
        assert list(data) == KEYS, name
    tree = json.loads(files["clip_benchmark/tree__clip-a__zeroshot_classification.json"].read_text())
    assert tree == {"dataset": "tree", "model": "clip-a", "pretrained": "/m/a", "task": "zeroshot_classification",
                    "metrics": {"acc1": 0.8, "mean_per_class_recall": 0.75}, "language": "en"}  # 2 classes: no acc5


def _e(i: int) -> np.ndarray:
    return np.eye(3)[i]


def test_scored_embeddings_give_recall_at_1_5_10_and_balanced_accuracy():
    """From embeddings through eval_scoring: recall@1/5/10 are reported even when the config asks
    for K = 2 only, and the files hold the figures worked out by hand below."""
    # retrieval: image i_n and text t_n describe each other; t1 looks like i2
    retrieval = RetrievalView("shapes", ["i0", "i1", "i2"], ["t0", "t1", "t2"], np.eye(3, dtype=bool), "by index")
    # zero-shot: classes x, y, z (template "a {}"); images z0..z3 of classes 0, 1, 2, 2
    zero_shot = ZeroShotView("classes", ["z0", "z1", "z2", "z3"], [0, 1, 2, 2], ["x", "y", "z"])
    views = Views(retrieval=[retrieval], zero_shot=[zero_shot])
    texts = {"t0": _e(0), "t1": _e(2), "t2": _e(2), "a x": _e(0), "a y": _e(1), "a z": _e(2)}
    images = {"i0": _e(0), "i1": _e(1), "i2": _e(2), "z0": _e(0), "z1": _e(0), "z2": _e(2), "z3": _e(2)}
    results = set_results(views, [2], ["a {}"], "test")
    report = EvalReport([], list(results.values()))
    score_model("clip", True, views, results, report, texts, images, ["a {}"], [2], heatmap_size=2)
    report.models.append(ModelRow("clip", "llm2clip", "/m/clip"))
    assert results["shapes"].metrics == ["i2t_r@1", "t2i_r@1", "i2t_r@2", "t2i_r@2", "i2t_r@5", "t2i_r@5", "i2t_r@10", "t2i_r@10"]
    assert results["classes"].chance["mean_per_class_recall"] == pytest.approx(1 / 3)
    shapes, classes = clip_benchmark.from_report(report)
    # images -> texts: i0 finds t0; i1 ties at 0 with all (t0 first, t1 second); i2 ties t1, t2 (t1 first): 1/3 @1, all @2
    # texts -> images: t0 finds i0, t2 finds i2; t1 (= i2) ranks i2, then i0 and i1 tied at 0: its i1 third
    assert shapes.metrics == {
        "image_retrieval_recall@1": pytest.approx(2 / 3), "text_retrieval_recall@1": pytest.approx(1 / 3),
        "image_retrieval_recall@2": pytest.approx(2 / 3), "text_retrieval_recall@2": 1.0,
        "image_retrieval_recall@5": 1.0, "text_retrieval_recall@5": 1.0,
        "image_retrieval_recall@10": 1.0, "text_retrieval_recall@10": 1.0}
    # top-1 predictions 0, 0, 2, 2 for classes 0, 1, 2, 2: accuracy 3/4; per class 1, 0, 1 -> 2/3; 3 classes: no acc5
    assert classes.metrics == {"acc1": 0.75, "mean_per_class_recall": pytest.approx(2 / 3)}
    assert (shapes.dataset, shapes.model, shapes.pretrained, classes.task) == ("shapes", "clip", "/m/clip", "zeroshot_classification")
