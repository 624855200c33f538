"""Scheduled refresh: ingest new images, recaption and embed only what is new.

    python -m jobs.refresh --config configs/local.yaml
    python -m jobs.refresh --config configs/local.yaml --status   # exit 0 if the last refresh succeeded
"""

from pipeline.stages.jobkit import job_main
from pipeline.stages.refresh import refresh_status, run_refresh

main = job_main("refresh", run_refresh, status=refresh_status)

if __name__ == "__main__":  # vLLM starts engine processes: keep the guard
    raise SystemExit(main())
