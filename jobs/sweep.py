"""Ray Tune over train-clip's recipe: cheap (cached frozen-tower features, seconds a trial) or full.

    python -m jobs.sweep --config configs/local.yaml [--set sweep.trials=32] [--set sweep.mode=full]
Ends by printing the best trial and the path of its config, ready for `jobs.train_clip --config`.
Run it again with the same config to resume a stopped sweep.
"""

from pipeline.stages.jobkit import job_main
from pipeline.stages.sweep import run_sweep, sweep_name

main = job_main("sweep", run_sweep, run_key=sweep_name)

if __name__ == "__main__":
    raise SystemExit(main())
