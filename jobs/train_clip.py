"""LLM2CLIP stage 2: the vision tower and text adapter against cached LLM embeddings (Ray Train + DeepSpeed).

    python -m jobs.train_clip --config configs/local.yaml [--set train_clip.encoder=ENCODER]
Ends by printing the model's path and MLflow model URI, which `jobs.evaluate` takes.
"""

from pipeline.stages.jobkit import job_main
from pipeline.stages.train_clip import plan_train_clip, run_train_clip

main = job_main("train_clip", run_train_clip, plan=plan_train_clip)

if __name__ == "__main__":
    raise SystemExit(main())
