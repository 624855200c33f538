"""Soak: `jobs.refresh` on a growing image listing, ROUNDS rounds, each killed at a random moment.

    python -m bench.soak [--rounds 20] [--images-per-round 4] [--seed 0] [--out soak.json]

Needs the local cluster (`make cluster-up`; the script reads `.run/cluster.env`). Each round adds
images to the listing, starts a refresh, SIGKILLs its process group after a random delay (or lets
it finish when the delay is past its end), then runs the refresh again to completion. After every
round the stores are checked (`tests.invariants`): every version readable, no key twice, nothing
committed before the kill lost, and every item accounted for (listed image -> manifest, dense
caption, embedding, or a reject with its reason). Prints and
writes a JSON report: kills, rounds recovered, rows lost, keys doubled. Not a CI test: about a
minute a round here.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from pipeline.stages.runtime import read_cluster_env
from pipeline.store import Store
from tests.invariants import check_stores

REPO = Path(__file__).resolve().parent.parent


def add_images(folder: Path, listing: Path, start: int, count: int) -> None:
    rng = np.random.default_rng(start)
    folder.mkdir(parents=True, exist_ok=True)
    with open(listing, "a") as f:
        for i in range(start, start + count):
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
            f.write(json.dumps({"image": f"img{i}.png", "captions": [f"photo number {i} of a noisy pattern"]}) + "\n")


def write_config(root: Path, listing: Path, env: dict[str, str]) -> Path:
    models = REPO / ".run" / "models"
    config = {
        "run_dir": str(root / "run"), "store": {"uri": str(root / "store")}, "ray": {"address": "auto"},
        "mlflow": {"enabled": True, "tracking_uri": env["MLFLOW_TRACKING_URI"], "experiment": "llm2clip-soak"},
        "models": {"dir": str(models), "llm": str(models / "smollm2-135m-instruct")},
        "ingest": {"source": str(listing), "dataset": "soak", "batch_size": 16},
        "recaption": {"mode": "text", "prompt": "Rewrite this short photo caption as a detailed description of the scene: {caption}",
                      "sampling": {"max_tokens": 24}, "actors": 1, "batch_size": 8, "commit_every": 4,
                      "engine_env": {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}},
        "embed": {"actors": 1, "batch_size": 32, "cra_split": None},
    }
    path = root / "soak.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def refresh(config: Path, env: dict[str, str], kill_after: float | None) -> tuple[int, bool]:
    """(return code, killed) of one refresh, SIGKILLed after `kill_after` seconds if still running."""
    proc = subprocess.Popen([sys.executable, "-m", "jobs.refresh", "--config", str(config)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        proc.wait(timeout=kill_after)
        return proc.returncode, False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        time.sleep(2)  # the cluster frees the dead job's actors
        return proc.returncode, True


def unaccounted(manifest: Store, store: Path, listed: int) -> int:
    """Items of the listing not accounted for after a finished refresh: each listed image is in
    the manifest or an ingest reject; each manifest image has a dense caption or a recaption
    reject; each caption has an embedding or an embed reject (input = written + rejected)."""
    rejects = Store(str(store), "rejects")
    rejected = lambda stage: {k[1].split("#")[0] for k in rejects.keys(stage)} if stage in rejects.versions() else set()  # noqa: E731
    images = {k[0] for k in manifest.keys("soak")} if "soak" in manifest.versions() else set()
    missing = max(0, listed - len(images) - len(rejected("ingest.soak")))
    captions, embeddings = Store(str(store), "captions"), Store(str(store), "embeddings")
    dense = [v for v in captions.versions() if v.startswith("text-")]
    caption_ids = {k[0] for v in ["original", *dense] if v in captions.versions() for k in captions.keys(v)}
    for version in dense:
        with_caption = {r["image_id"] for r in captions.read(version, columns=["image_id"]).to_pylist()}
        missing += len(images - with_caption - rejected(f"recaption.{version}"))
    for version in embeddings.versions():
        missing += len(caption_ids - {k[0] for k in embeddings.keys(version)} - rejected(f"embed.{version}"))
    return missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--images-per-round", type=int, default=4)
    parser.add_argument("--max-delay", type=float, default=60.0, help="kills land uniformly in [5, max-delay] seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--root", default=str(REPO / ".run" / "soak"))
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    env = {**os.environ, **read_cluster_env(str(REPO / ".run")), "PYTHONUNBUFFERED": "1"}
    if "RAY_ADDRESS" not in env:
        raise SystemExit("start the local cluster first: make cluster-up")
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    folder, listing = root / "incoming", root / "incoming" / "listing.jsonl"
    config = write_config(root, listing, env)
    rng = random.Random(args.seed)
    report = {"rounds": args.rounds, "kills": 0, "finished_before_kill": 0, "recovered": 0, "failed_reruns": 0,
              "rows_lost": 0, "keys_doubled": 0, "items_unaccounted": 0, "rounds_detail": []}
    for r in range(args.rounds):
        add_images(folder, listing, r * args.images_per_round, args.images_per_round)
        delay = rng.uniform(5.0, args.max_delay)
        rc, killed = refresh(config, env, delay)
        report["kills"] += killed
        report["finished_before_kill"] += not killed and rc == 0
        detail = {"round": r, "kill_after_s": round(delay, 1), "killed": killed}
        try:  # right after the kill: every version readable, no key twice
            at_kill = check_stores(str(root / "store")) if (root / "store").exists() else {}
        except AssertionError as e:
            report["keys_doubled"] += 1
            detail["error"] = str(e)[:300]
            at_kill = {}
        rc_again, _ = refresh(config, env, None)
        detail["rerun_rc"] = rc_again
        try:
            after = check_stores(str(root / "store"))
        except AssertionError as e:  # a key written twice
            report["keys_doubled"] += 1
            detail["error"] = str(e)[:300]
            after = {}
        lost = sum(len(rows - after.get(where, set())) for where, rows in at_kill.items())  # committed before the kill
        missing = unaccounted(Store(str(root / "store"), "manifest"), root / "store", sum(1 for _ in open(listing)))
        report["rows_lost"] += lost
        report["items_unaccounted"] += missing
        report["failed_reruns"] += rc_again != 0
        report["recovered"] += rc_again == 0 and lost == 0 and "error" not in detail and missing == 0
        detail |= {"rows_lost": lost, "items_unaccounted": missing}
        report["rounds_detail"].append(detail)
        print(json.dumps(detail), flush=True)
    summary = {k: v for k, v in report.items() if k != "rounds_detail"}
    print(json.dumps(summary))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    return 0 if report["recovered"] == args.rounds else 1


if __name__ == "__main__":
    raise SystemExit(main())
