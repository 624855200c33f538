"""Benchmark: captions/s of the embed job against a naive loop, in the same run.

Naive loop: the same model (SmolLM2-135M-Instruct, mean pooling), one process, fixed
batch of 32, padded to the longest, fp32, input order. Job: `run_embed` (Ray Data actor
pool, length-sorted batches, bf16 where the CPU/GPU has it), wall time including actor
start and model loads. Both embed the captions of the embedded default.

    python -m bench.embed [--scenes 200] [--config configs/local.yaml]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import pyarrow as pa

from pipeline.config import load_config
from pipeline.hardware import resolve_precision
from pipeline.stages import runtime
from pipeline.stages.embed import run_embed
from pipeline.stages.ingest import run_ingest
from pipeline.stages.tracking import Tracker
from pipeline.store import Store
from pipeline.text_encoder import TextEncoder


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/local.yaml")
    parser.add_argument("--scenes", type=int, default=200)
    parser.add_argument("--actors", type=int, default=2)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-embed-") as tmp:
        cfg = load_config(
            args.config,
            [f"store.uri={tmp}/store", f"embedded.num_scenes={args.scenes}", "mlflow.enabled=false",
             f"embed.actors={args.actors}", "embed.cra_split=null"],
        )
        runtime.connect(cfg.ray, cfg.run_dir)
        run_ingest(cfg, Tracker(None, None))
        captions = Store(cfg.store.uri, "captions")
        texts = pa.concat_tables([captions.read(v) for v in cfg.embed.caption_versions]).column("text").to_pylist()

        start = time.perf_counter()
        naive = TextEncoder.from_pretrained(cfg.models.llm, dtype="fp32", bidirectional=cfg.embed.bidirectional, pooling="mean")
        naive.encode(texts, batch_size=32, sort_by_length=False)
        naive_s = time.perf_counter() - start
        # the batching paths alone, one process, the job's precision: input order, sorted by token count, packed
        encoder = TextEncoder.from_pretrained(cfg.models.llm, dtype=resolve_precision(cfg.embed.precision, False))
        paths = {}
        for name, kwargs in {"input_order": {"sort_by_length": False}, "sorted": {}, "packed": {"packed": True}}.items():
            began = time.perf_counter()
            encoder.encode(texts, batch_size=cfg.embed.micro_batch_size, **kwargs)
            paths[name] = round(len(texts) / (time.perf_counter() - began), 1)

        start = time.perf_counter()
        result = run_embed(cfg, Tracker(None, None))
        job_s = time.perf_counter() - start
    report = {
        "benchmark": "embed",
        "captions": len(texts),
        "model": Path(cfg.models.llm).name,
        "naive_captions_per_s": round(len(texts) / naive_s, 1),
        "job_captions_per_s": round(result.written / job_s, 1),
        "job_precision": result.precision,
        "job_actors": args.actors,
        "ratio": round((result.written / job_s) / (len(texts) / naive_s), 2),
        "target_ratio": 2.0,
        "job_phases_s": result.phases,
        "job_encode_s_summed_over_actors": result.encode_seconds,
        "encode_paths_captions_per_s": paths,
    }
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
