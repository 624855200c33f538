"""MLflow's UI in a real headless browser: a fake pipeline (parent run with nested stage runs, a
comparison table, lineage, stepped metrics) on a throwaway MLflow server, reviewed as a person
would (no Ray, no models)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.browser import DEMO_STAGES, experiment_runs_url, make_demo_runs, review_parent_run, run_url


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """A throwaway MLflow server on loopback, as cluster/local.sh starts it (proxied artifacts)."""
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "mlflow.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                             "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1"],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                            # no job runner (its huey consumers, for GenAI jobs, are 7 processes to start and stop)
                            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2):
                    break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "mlflow.log").read_text()[-3000:]
                time.sleep(0.3)
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its uvicorn worker: the group this fixture started
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def test_pipeline_review_in_browser(mlflow_server, tmp_path):
    eid, pid = make_demo_runs(mlflow_server, "llm2clip-browser")
    shots = tmp_path / "screenshots"
    review = review_parent_run(mlflow_server, eid, pid, shots)

    # A bare experiment link opens MLflow 3.17's GenAI view; the project's links open the runs.
    assert review.default_view.workflow_type == "genai", review.default_view
    assert review.runs_view.requested == experiment_runs_url(mlflow_server, eid)
    assert review.runs_view.workflow_type == "machine_learning", review.runs_view
    assert review.runs_view.heading == "Runs" and "Runs" in review.runs_view.nav, review.runs_view
    assert "Sessions" not in review.runs_view.nav, review.runs_view

    # The stages are nested under the parent: hidden until it is expanded.
    assert review.runs_collapsed == ["pipeline"]
    assert review.runs_expanded[0] == "pipeline" and sorted(review.runs_expanded[1:]) == sorted(DEMO_STAGES)
    assert sorted(review.child_runs) == sorted(DEMO_STAGES)

    assert {"comparison.json", "lineage.json"} <= set(review.artifacts)
    assert review.table_columns == ["model", "i2t_r@1", "t2i_r@1"]
    assert review.table_rows == [["clip-baseline", "0.31", "0.29"], ["llm2clip", "0.42", "0.4"]]
    assert "recall_at_1" in review.metric_charts

    for name in ("mlflow-pipeline-runs.png", "mlflow-pipeline-comparison.png"):
        assert (shots / name).stat().st_size > 10_000, name
    assert run_url(mlflow_server, eid, pid, artifact="comparison.json").endswith(
        f"/#/experiments/{eid}/runs/{pid}/artifacts/comparison.json?workflowType=machine_learning")
