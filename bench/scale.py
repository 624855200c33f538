"""Benchmark: how the pipeline's cost grows with the number of items (1k, 10k, 100k).

For each size, in a fresh process (so its driver's peak RSS is its own):

1. N synthetic 32 px PNGs with provided captions are written as WebDataset shards
   (`{key}.png`, `{key}.txt`, `{key}.json`, `--per-shard` samples a shard, as img2dataset
   writes them; not timed);
2. the stages run in this process, the driver, on a private local Ray with MLflow off:
   ingest (from the shards' brace pattern), embed (the tiny random Llama), the train-clip
   sample join, and one epoch of train-clip (the tiny random CLIP vision tower, 32 px);
3. the same four stages run again, with nothing to do.

Reported per size: seconds per item of each stage, the driver's peak RSS during each stage
(sampled every 50 ms) and overall, and the do-nothing re-run's seconds. Goals (checked at
the largest size against the one before it): per-item time within 1.3x for every stage,
driver peak RSS under 1.5 GB and growing less than linearly, a do-nothing re-run under 60 s.

    python -m bench.scale [--sizes 1000 10000 100000] [--per-shard 1000] [--out bench/results/scale.json]
    python -m bench.scale --smoke          # 1k items: the run `make test` does (no goals checked)
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODELS = Path(os.environ.get("LLM2CLIP_RUN_DIR", REPO / ".run")).resolve() / "models"  # where `make models` puts them
GOAL_PER_ITEM_RATIO = 1.3
GOAL_RSS_BYTES = 1.5e9
GOAL_RERUN_S = 60.0
STAGES = ["ingest", "embed", "join", "train_clip"]


def png(i: int, side: int = 32) -> bytes:
    """A distinct 32 px PNG for index i (lossless: the pixel that encodes i makes its bytes unique)."""
    from PIL import Image

    image = Image.new("RGB", (side, side), ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256))
    image.putpixel((0, 0), (i & 255, (i >> 8) & 255, (i >> 16) & 255))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]


def write_shards(folder: Path, items: int, per_shard: int) -> str:
    """The items as WebDataset shards; returns their brace pattern."""
    folder.mkdir(parents=True, exist_ok=True)
    shards = -(-items // per_shard)
    for s in range(shards):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for i in range(s * per_shard, min(items, (s + 1) * per_shard)):
                key = f"{i:09d}"
                caption = f"a small {COLOURS[i % len(COLOURS)]} square, photo {i}"
                for name, data in ((f"{key}.png", png(i)), (f"{key}.txt", caption.encode()),
                                   (f"{key}.json", json.dumps({"key": key, "caption": caption}).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return f"{folder}/{{{0:05d}..{shards - 1:05d}}}.tar"


class PeakRss:
    """The process's peak resident memory while the block runs (sampled every 50 ms)."""

    def __init__(self) -> None:
        import psutil

        self.process, self.peak, self._stop = psutil.Process(), 0, threading.Event()

    def __enter__(self) -> PeakRss:
        self.peak = self.process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def overrides(root: Path, pattern: str, items: int, models: Path = MODELS) -> list[str]:
    return [f"run_dir={root}/run", f"store.uri={root}/store", "ray.address=local", "mlflow.enabled=false",
            f"models.dir={models}", f"models.llm={models}/tiny-llama", f"models.vision={models}/tiny-clip-vision",
            f"ingest.source={pattern}", "ingest.dataset=scale", "ingest.batch_size=512",
            "embed.caption_versions=[original]", "embed.actors=2", "embed.batch_size=1024", "embed.micro_batch_size=256",
            "embed.cra_split=null", "embed.precision=fp32",
            "train_clip.caption_weights={original: 1.0}", "train_clip.eval_captions={original: original}",
            "train_clip.epochs=1", "train_clip.num_workers=1", "train_clip.cpus_per_worker=1", "train_clip.precision=fp32",
            "train_clip.zero_stage=0", "train_clip.embed_dim=32", "train_clip.image_size=32", "train_clip.global_batch_size=256",
            f"train_clip.checkpoint_every={max(10, items // 256)}", "train_clip.warmup_steps=0", "train_clip.register_as=null"]


def run_one(items: int, per_shard: int, root: Path, models: Path = MODELS) -> dict:
    """One size, in this process: shards written, four stages, then the same four again. `models`: the
    folder `make models` filled (it holds tiny-llama and tiny-clip-vision)."""
    from pipeline.config import load_config
    from pipeline.stages import runtime
    from pipeline.stages.clip_samples import ClipInputs
    from pipeline.stages.embed import run_embed
    from pipeline.stages.ingest import run_ingest
    from pipeline.stages.tracking import Tracker
    from pipeline.stages.train_clip import run_train_clip

    began = time.perf_counter()
    pattern = write_shards(root / "shards", items, per_shard)
    report: dict = {"items": items, "per_shard": per_shard, "write_shards_s": round(time.perf_counter() - began, 1)}
    cfg = load_config(str(REPO / "configs" / "local.yaml"), overrides(root, pattern, items, models))
    runtime.connect(cfg.ray, cfg.run_dir)
    steps = {"ingest": lambda: run_ingest(cfg, Tracker(None, None)),
             "embed": lambda: run_embed(cfg, Tracker(None, None)),
             "join": lambda: ClipInputs.resolve(cfg).joined(cfg).samples.meta,
             "train_clip": lambda: run_train_clip(cfg, Tracker(None, None))}
    for phase in ("first", "rerun"):
        report[phase] = {}
        for stage, step in steps.items():
            with PeakRss() as rss:
                start = time.perf_counter()
                result = step()
                seconds = time.perf_counter() - start
            report[phase][stage] = {"seconds": round(seconds, 2), "per_item_ms": round(1000 * seconds / items, 4),
                                    "driver_peak_rss_mb": round(rss.peak / 2**20, 1), **_counts(stage, result)}
    report["rerun_seconds"] = round(sum(s["seconds"] for s in report["rerun"].values()), 2)
    report["driver_peak_rss_mb"] = round(max(s["driver_peak_rss_mb"] for p in ("first", "rerun") for s in report[p].values()), 1)
    return report


def _counts(stage: str, result) -> dict:
    if stage == "ingest":
        return {"added": result.added, "skipped": result.skipped, "rejected": result.rejected, "opened": result.opened}
    if stage == "embed":
        return {"written": result.written, "skipped": result.skipped}
    if stage == "join":
        return {"train": result.num_train, "val": result.num_val}
    return {"steps": result.steps, "reused": bool(getattr(result, "reused", False))}


def checks(reports: list[dict]) -> dict:
    big, before = reports[-1], reports[-2] if len(reports) > 1 else None
    out = {"rerun_under_60s": big["rerun_seconds"] < GOAL_RERUN_S, "rss_under_1_5gb": big["driver_peak_rss_mb"] * 2**20 < GOAL_RSS_BYTES,
           "rerun_did_nothing": big["rerun"]["ingest"]["opened"] == 0 and big["rerun"]["embed"]["written"] == 0
           and big["rerun"]["train_clip"]["reused"]}
    if before:
        for stage in STAGES:
            ratio = big["first"][stage]["per_item_ms"] / before["first"][stage]["per_item_ms"]
            out[f"{stage}_per_item_ratio"] = round(ratio, 3)
            out[f"{stage}_within_1_3x"] = ratio <= GOAL_PER_ITEM_RATIO
        growth = big["driver_peak_rss_mb"] / before["driver_peak_rss_mb"]
        out["rss_growth"] = round(growth, 3)
        out["rss_sublinear"] = growth < big["items"] / before["items"]
    return out


def plot(reports: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [r["items"] for r in reports]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for stage in STAGES:
        left.plot(sizes, [r["first"][stage]["per_item_ms"] for r in reports], marker="o", label=stage)
    left.set(xscale="log", yscale="log", xlabel="items", ylabel="ms per item", title="time per item, by stage")
    left.legend()
    right.plot(sizes, [r["driver_peak_rss_mb"] for r in reports], marker="o", label="driver peak RSS")
    right.axhline(GOAL_RSS_BYTES / 2**20, color="grey", linestyle="--", label="goal 1.5 GB")
    right.set(xscale="log", yscale="log", xlabel="items", ylabel="MiB", title="driver peak RSS", ylim=(100, 4000))
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(reports: list[dict]) -> str:
    head = "| items | " + " | ".join(f"{s} ms/item" for s in STAGES) + " | driver peak RSS | do-nothing re-run |"
    lines = [head, "|" + "---|" * (len(STAGES) + 3)]
    for r in reports:
        cells = [f"{r['first'][s]['per_item_ms']:.3f}" for s in STAGES]
        lines.append(f"| {r['items']:,} | " + " | ".join(cells) + f" | {r['driver_peak_rss_mb']:.0f} MiB | {r['rerun_seconds']:.1f} s |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--per-shard", type=int, default=1_000)
    parser.add_argument("--out", type=Path, default=None, help="write the report (JSON) and its plot (.png beside it)")
    parser.add_argument("--smoke", action="store_true", help="1k items, no goals: what `make test` runs")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # a size, in this process
    parser.add_argument("--workdir", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print("REPORT " + json.dumps(run_one(args.one, args.per_shard, args.workdir)), flush=True)
        return {}
    sizes = [1_000] if args.smoke else args.sizes
    reports = []
    for items in sizes:
        work = Path(tempfile.mkdtemp(prefix=f"bench-scale-{items}-"))
        try:
            out = subprocess.run([sys.executable, "-m", "bench.scale", "--one", str(items), "--per-shard", str(args.per_shard),
                                  "--workdir", str(work)], cwd=REPO, capture_output=True, text=True, env={**os.environ, "RAY_DEDUP_LOGS": "0"})
            line = next((ln for ln in out.stdout.splitlines() if ln.startswith("REPORT ")), None)
            if out.returncode != 0 or line is None:
                raise RuntimeError(f"{items} items failed (rc {out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}")
            reports.append(json.loads(line[len("REPORT "):]))
            print(json.dumps(reports[-1]), flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    report = {"benchmark": "scale", "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
              f"{round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30)} GiB", "sizes": reports,
              "checks": {} if args.smoke else checks(reports)}
    print(table(reports))
    if report["checks"]:
        print(json.dumps(report["checks"], indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
        plot(reports, args.out.with_suffix(".png"))
    return report


if __name__ == "__main__":
    main()
