"""The report: tables hold exactly the scores given, protocols and chance sit beside them,
problems are listed, plots are written (no Ray)."""

import json

import numpy as np

from pipeline.eval_report import EvalReport, ModelRow, Problem, SetResult


def _report() -> EvalReport:
    cra = SetResult("everyday-pairs", "cra", "CRA: 60 caption pairs; ...", {"cra": 1 / 119},
                    {"enc-raw": {"cra": 0.25}, "enc-ft": {"cra": 0.5}})
    ret = SetResult("coco", "retrieval", "5 images, 10 distinct captions", {"i2t_r@1": 0.2, "t2i_r@1": 0.2},
                    {"clip-a": {"i2t_r@1": 0.6, "t2i_r@1": 0.4}})
    zs = SetResult("fm", "zero_shot", "10 classes", {"top1": 0.1, "top5": 0.5}, {"clip-a": {"top1": 0.3125, "top5": 0.75}})
    report = EvalReport(
        [ModelRow("enc-raw", "text_encoder", "/m/raw"), ModelRow("enc-ft", "text_encoder", "/m/ft"),
         ModelRow("clip-a", "llm2clip", "/m/a", "LLM2CLIP on enc-x")],
        [cra, ret, zs], [Problem("coco", "/data/missing.jpg", "missing_file")])
    report.plots.curves["coco"] = {"clip-a": (np.array([0.6, 0.8, 1.0]), np.array([0.4, 0.9, 1.0]))}
    report.plots.heatmaps["clip-a @ coco"] = (np.eye(3), ["image 0", "image 1", "image 2"], ["a", "b", "c"])
    report.plots.confusions["clip-a @ fm"] = (np.eye(2, dtype=int), ["x", "y"])
    return report


def test_markdown_and_json_hold_every_score_protocol_and_chance(tmp_path):
    files = _report().write(tmp_path)
    md = files["results.md"].read_text()
    for text in ("| enc-ft | 0.5000 |", "| clip-a | 0.6000 | 0.4000 |", "| clip-a | 0.3125 | 0.7500 |", "| *chance* | 0.0084 |",
                 "Protocol: CRA: 60 caption pairs", "Protocol: 10 classes", "`/data/missing.jpg`: missing_file"):
        assert text in md, text
    data = json.loads(files["results.json"].read_text())
    rows = {r["model"]: r for r in data["rows"]}
    assert rows["enc-ft"]["everyday-pairs/cra"] == 0.5 and rows["enc-ft"]["coco/i2t_r@1"] is None
    assert rows["clip-a"]["fm/top1"] == 0.3125 and data["chance"]["fm/top5"] == 0.5
    assert data["protocols"]["coco"] == "5 images, 10 distinct captions" and data["problems"][0]["reason"] == "missing_file"


def test_plots_are_written(tmp_path):
    files = _report().write(tmp_path)
    plots = sorted(k for k in files if k.startswith("plots/"))
    assert plots == ["plots/confusion.clip-a.fm.png", "plots/cra_before_after.png", "plots/recall_at_k.coco.png",
                     "plots/similarity.clip-a.coco.png"]
    assert all(files[k].stat().st_size > 1000 and files[k].read_bytes()[:4] == b"\x89PNG" for k in plots)
