"""The scale bench's 500-item smoke run (`bench/scale.py`; the full curve is `make bench-scale`):
WebDataset shards through ingest, embed, the train-clip sample join and one epoch of train-clip,
then the same again with nothing to do, on the test cluster."""

from __future__ import annotations

import json


def test_scale_bench_smoke_run(tmp_path, ray_session, models):
    from bench.scale import STAGES, plot, run_one, table

    # the models by the fixture's paths: the test session points LLM2CLIP_RUN_DIR at the test run dir
    report = run_one(500, 125, tmp_path / "work", models["tiny-llama"].parent)
    first, rerun = report["first"], report["rerun"]
    assert (first["ingest"]["added"], first["ingest"]["rejected"], first["ingest"]["opened"]) == (500, 0, 500)
    assert first["embed"]["written"] == 500
    assert 350 < first["join"]["train"] < 450 and first["join"]["train"] + first["join"]["val"] < 500  # the test split is held out
    assert first["train_clip"]["steps"] == first["join"]["train"] // 256 and not first["train_clip"]["reused"]
    # the re-run opens no image, embeds nothing, joins nothing new and trains nothing
    assert (rerun["ingest"]["opened"], rerun["ingest"]["skipped"], rerun["embed"]["written"]) == (0, 500, 0)
    assert rerun["join"] == {**rerun["join"], "train": first["join"]["train"]} and rerun["train_clip"]["reused"]
    assert all(first[s]["per_item_ms"] > 0 and first[s]["driver_peak_rss_mb"] > 0 for s in STAGES)
    assert report["rerun_seconds"] < sum(first[s]["seconds"] for s in STAGES)
    assert "| 500 |" in table([report])
    plot([report], tmp_path / "scale.png")
    assert (tmp_path / "scale.png").stat().st_size > 0
    json.dumps(report)  # what the bench writes
