"""Embed caption-store versions with a text encoder into the embedding store.

    python -m jobs.embed --config configs/local.yaml [--set embed.encoder=PATH_OR_MLFLOW_URI]
"""

from pipeline.stages.embed import plan_embed, run_embed
from pipeline.stages.jobkit import job_main

main = job_main("embed", run_embed, plan=plan_embed)

if __name__ == "__main__":
    raise SystemExit(main())
