"""Build the everyday caption corpus for stage 1 with the recaption job's text mode.

    python -m jobs.corpus --config configs/local.yaml [--set corpus.num_items=600]
"""

from pipeline.stages.corpus import plan_corpus, run_corpus
from pipeline.stages.jobkit import job_main

main = job_main("corpus", run_corpus, plan=plan_corpus)

if __name__ == "__main__":  # vLLM starts engine processes: keep the guard
    raise SystemExit(main())
