"""Stages: the core wired into Ray Data / Train / Tune, vLLM and MLflow. One module a stage."""
