"""Caption-contrastive fine-tuning of the LLM (LLM2CLIP stage 1) with Ray Train + DeepSpeed.

    python -m jobs.finetune_text --config configs/local.yaml
Ends by printing the merged encoder's path, encoder_version and MLflow model URI, which
`jobs.embed` takes as `embed.encoder`.
"""

from pipeline.stages.finetune_text import plan_finetune_text, run_finetune_text
from pipeline.stages.jobkit import job_main

main = job_main("finetune_text", run_finetune_text, plan=plan_finetune_text)

if __name__ == "__main__":
    raise SystemExit(main())
