"""The whole LLM2CLIP pipeline as one resumable job, under one MLflow parent run.

    python -m jobs.pipeline --config configs/local.yaml [--from STAGE] [--until STAGE] [--dry-run]
Stages: ingest, recaption, embed, corpus, finetune-text, embed-finetuned, train-clip, evaluate
(and sweep with --set pipeline.sweep=true). Run it again after a failure: finished stages are
skipped, a killed training stage resumes from its checkpoint. Ends with the evaluation's
comparison table and the MLflow URL of the parent run.
"""

from pipeline.stages.jobkit import job_main
from pipeline.stages.pipeline import pipeline_key, print_plan, run_pipeline

main = job_main("pipeline", run_pipeline, run_key=pipeline_key, plan=print_plan,
                flags={"--from": ("pipeline.from_stage", "start at this stage; earlier stages' outputs must exist"),
                       "--until": ("pipeline.until_stage", "stop after this stage")})

if __name__ == "__main__":  # vLLM starts engine processes: keep the guard
    raise SystemExit(main())
