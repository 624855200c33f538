"""The test rig itself (tests/rig.py, issue 32): MLflow's artifacts land in the S3 server's bucket
through the tracking server. The second node's isolation is checked in tests/test_pipeline.py,
the one module that starts it (its kill drill there kills and brings back the node)."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import MLFLOW_BUCKET

pytestmark = pytest.mark.timeout(300)


def test_mlflow_artifacts_go_through_the_server_to_the_bucket(cluster, s3, tmp_path):
    client = MlflowClient(cluster["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("llm2clip-tests-rig")
    run = client.create_run(experiment.experiment_id if experiment else client.create_experiment("llm2clip-tests-rig"))
    (tmp_path / "probe.txt").write_text("rig artifact")
    client.log_artifact(run.info.run_id, str(tmp_path / "probe.txt"), "rig")
    client.set_terminated(run.info.run_id)
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")  # clients go through the server
    back = client.download_artifacts(run.info.run_id, "rig/probe.txt", str(tmp_path / "back"))
    assert open(back).read() == "rig artifact"
    assert any(k.endswith(f"{run.info.run_id}/artifacts/rig/probe.txt") for k in s3.keys(MLFLOW_BUCKET))
