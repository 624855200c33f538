"""Write a manifest version as WebDataset shards that open_clip reads (images, captions, LLM embeddings).

    python -m jobs.export --config configs/local.yaml [--set export.encoder_version=enc-...] [--set export.split=train]
"""

from pipeline.stages.export import plan_export, run_export
from pipeline.stages.jobkit import job_main

main = job_main("export", run_export, plan=plan_export)

if __name__ == "__main__":
    raise SystemExit(main())
