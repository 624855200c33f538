"""Ingest images + captions (the embedded default, a folder, or a listing) into the stores.

    python -m jobs.ingest --config configs/local.yaml [--set ingest.source=/data/listing.jsonl]
"""

from pipeline.stages.ingest import plan_ingest, run_ingest
from pipeline.stages.jobkit import job_main

main = job_main("ingest", run_ingest, plan=plan_ingest)

if __name__ == "__main__":
    raise SystemExit(main())
