"""Job entry points: `python -m jobs.NAME --config FILE [--set key=value ...]`.

Each module only parses its config, connects to Ray, calls one stage and prints a
summary (see pipeline.stages.jobkit); all logic lives in `pipeline`.
"""
