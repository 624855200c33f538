"""What every job entry point shares: arguments, config, Ray, an MLflow run, its result.

A job module is then three lines: `main = job_main("ingest", run_ingest)`. The stage's
result (a dataclass) is printed with its labels and, with `--summary-json`, written as JSON
by field name (`pipeline.records`); `main.result_type` names its type for scripts and tests.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
import yaml

from pipeline.config import ConfigError, PipelineConfig, config_to_dict, load_config
from pipeline.listing import ListingError
from pipeline.plans import StagePlan
from pipeline.records import Reported, printable, to_json
from pipeline.stages import runtime, tracking
from pipeline.uri import LocationError, read_text

#: Errors in what the user gave (a location that is not there, a listing that cannot be read).
INPUT_ERRORS = (LocationError, ListingError)

StageFn = Callable[[PipelineConfig, tracking.Tracker], Any]


StatusFn = Callable[[PipelineConfig], int]
PlanFn = Callable[[PipelineConfig], "StagePlan | int"]


def parse_args(stage: str, argv: list[str] | None, status: StatusFn | None = None, epilog: str | None = None,
               plan: PlanFn | None = None, flags: dict[str, tuple[str, str]] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m jobs.{stage}", description=f"llm2clip-pipeline: {stage} job", epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config file (e.g. configs/local.yaml)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set ingest.source=/data/listing.jsonl (repeatable)",
    )
    parser.add_argument("--validate-only", action="store_true", help="check the config and exit")
    parser.add_argument("--summary-json", metavar="PATH", help="also write the job's result as JSON to PATH, keyed by field name (for scripts)")
    if status is not None:
        parser.add_argument("--status", action="store_true", help=f"print the last {stage}'s record; exit 0 if it succeeded, else 1")
    if plan is not None:
        parser.add_argument("--dry-run", action="store_true", help="print what would run, what is skipped and why; run nothing")
    for flag, (key, text) in (flags or {}).items():
        parser.add_argument(flag, metavar="STAGE", help=f"{text} (sets {key})")
    args = parser.parse_args(argv)
    # A flag is a short form of --set KEY=VALUE: the config validates it like any other value.
    args.overrides += [f"{key}={getattr(args, flag.lstrip('-').replace('-', '_'))}" for flag, (key, _) in (flags or {}).items()
                       if getattr(args, flag.lstrip('-').replace('-', '_')) is not None]
    return args


RunKeyFn = Callable[[PipelineConfig], str]


def job_main(stage: str, run: StageFn, status: StatusFn | None = None, epilog: str | None = None,
             run_key: RunKeyFn | None = None, plan: PlanFn | None = None,
             flags: dict[str, tuple[str, str]] | None = None) -> Callable[[list[str] | None], int]:
    """`run_key`: a resumable job's identity (computed once Ray is up); a re-run with the same
    key reopens the job's MLflow run instead of starting another. `plan`: what `--dry-run`
    prints (a stage's plan, or a function that prints and returns the exit code). `flags`:
    extra options, each a short form of `--set KEY=VALUE` ({"--from": (KEY, help)})."""
    def main(argv: list[str] | None = None) -> int:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        args = parse_args(stage, argv, status, epilog, plan, flags)
        try:
            cfg = load_config(args.config, args.overrides)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if args.validate_only:
            print(f"{args.config}: valid")
            return 0
        try:
            return _run(stage, run, cfg, args, status, plan, run_key)
        except INPUT_ERRORS as e:  # a location or listing the user gave: one line naming it, no traceback
            print(f"error: {e}", file=sys.stderr)
            return 2

    main.result_type = typing.get_type_hints(run)["return"]
    return main


def _run(stage: str, run: StageFn, cfg: PipelineConfig, args: argparse.Namespace, status: StatusFn | None,
         plan: PlanFn | None, run_key: RunKeyFn | None) -> int:
    if getattr(args, "status", False):
        return status(cfg)
    if getattr(args, "dry_run", False):
        shown = plan(cfg)
        if isinstance(shown, StagePlan):
            print(shown.line())
            return 0
        return shown
    start = time.time()
    if cfg.mlflow.enabled:  # workers resolve models:/ URIs on their own nodes, from this server (runtime_env)
        os.environ["MLFLOW_TRACKING_URI"] = cfg.mlflow.tracking_uri
    owns_ray = not ray.is_initialized()  # a job run inside a test shares the test's connection
    address = runtime.connect(cfg.ray, cfg.run_dir)
    config_text = read_text(args.config) + "".join(f"# --set {o}\n" for o in args.overrides)
    resolved = config_to_dict(cfg)
    key = run_key(cfg) if run_key else None
    with tracking.start_run(cfg.mlflow, stage, resolved, config_text=config_text, run_key=key) as tracker:
        result = run(cfg, tracker)
        tracker.log_metrics({"wall_seconds": time.time() - start})
    if owns_ray:
        ray.shutdown()  # prints the workers' buffered log lines now (Ray holds repeats back), not after the summary
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(to_json(result), indent=2))
    if isinstance(result, Reported) and result.report_markdown:  # the report first: the summary and its links last
        print("\n" + result.report_markdown)
    print(f"\n== {stage} finished in {time.time() - start:.1f}s on Ray at {address}")
    print(yaml.safe_dump(printable(result), sort_keys=False).rstrip())
    return 0
