"""Write dense captions for a manifest version with vLLM (image or text mode).

    python -m jobs.recaption --config configs/local.yaml [--set recaption.mode=image]
"""

from pipeline.stages.jobkit import job_main
from pipeline.stages.recaption import plan_recaption, run_recaption

main = job_main("recaption", run_recaption, plan=plan_recaption)

if __name__ == "__main__":  # vLLM starts engine processes: keep the guard
    raise SystemExit(main())
