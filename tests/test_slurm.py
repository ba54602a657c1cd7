"""The cluster recipe runs for real (issue 28): `examples/cluster/sample.sbatch`, unchanged, as a
Slurm array on a private single-node Slurm cluster (`tests/slurm.py`), its workers on one Optuna
study in a private PostgreSQL and one `mlflow server`. One array task is cancelled mid-net and
another task hits its time limit; their nets' configurations are trained again by the others,
and the campaign still ends with exactly its target of FINISHED nets and nothing left RUNNING."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.conftest import ROOT
from tests.slurm import Slurm
from tests.test_scale import campaign_trials, net_runs

pytestmark = pytest.mark.slow
RECIPE = ROOT / "examples" / "cluster" / "sample.sbatch"
CAMPAIGN = "slurm"
UNREACHED = 100_000
"""The first task's target: more nets than any machine trains in its one minute."""
ARRAY_NETS = 10
"""Nets the array must add: the target is set when the array is submitted, from the nets the
first task left, so that the array has work left however fast the machine trained before (with
a fixed target, a quiet machine left the array two nets, it finished them between two polls and
the wait for the array at work never ended)."""
SMALL_NETS = "max_epochs=4 min_epochs=4 prints=2 max_train_images=256 max_eval_images=64"


@pytest.fixture(scope="module")
def slurm():
    root = Path(tempfile.mkdtemp(prefix="nws-slurm-"))
    cluster = Slurm(root)
    yield cluster
    cluster.stop()


def wait_for(condition, what: str, limit: float = 1200) -> None:
    """Poll an observable state; `limit` only ends a hang."""
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(1)


def test_an_array_of_the_recipe_reaches_its_target_through_a_cancel_and_a_time_limit(
    slurm, postgres, mlflow_server, tmp_path, monkeypatch
):
    storage = postgres.database()
    env = {**slurm.env, "MLFLOW_TRACKING_URI": mlflow_server.url, "NWS_STORAGE": storage,
           "NWS_CAMPAIGN": CAMPAIGN, "NWS_TARGET": str(UNREACHED), "NWS_SUBSET": "fixed",
           "NWS_DATASETS": "digits,shapes", "NWS_DATA_DIR": str(tmp_path / "data"), "NWS_DOWNLOAD": "false",
           "NWS_HEARTBEAT": "3", "NWS_VENV": sys.prefix, "NWS_SAMPLE_PARAMS": SMALL_NETS}  # fmt: skip
    slurm.env = env
    common = ["sbatch", "--parsable", "--cpus-per-task=1", "--mem=2G", f"--output={tmp_path}/task-%A_%a.log"]

    def trials(state: str) -> list:
        return [t for t in campaign_trials(storage, CAMPAIGN) if t.state.name == state]

    def queue_empty() -> bool:
        return not slurm.run("squeue", "-h", "-o", "%i").stdout.strip()

    # A task alone with a one-minute limit: Slurm ends it mid-campaign (SIGTERM, then SIGKILL).
    limited = slurm.run(*common, "--array=0", "--time=1", str(RECIPE)).stdout.strip()
    wait_for(queue_empty, "the time limit to end the first task")
    before = len(trials("COMPLETE"))
    assert before > 0
    # Then an array of two, to a target ARRAY_NETS above what the first task left: one is
    # cancelled once the array has finished two nets; the other finishes the campaign.
    target = before + ARRAY_NETS
    slurm.env = {**env, "NWS_TARGET": str(target)}  # sbatch passes its environment to the tasks
    array = slurm.run(*common, "--array=0-1", "--time=30", str(RECIPE)).stdout.strip()
    wait_for(
        lambda: (len(trials("COMPLETE")) >= before + 2 and trials("RUNNING")) or queue_empty(),
        "the array at work",
    )
    assert not queue_empty(), "the array ended before one of its tasks could be cancelled"
    slurm.run("scancel", f"{array}_1")
    wait_for(queue_empty, "every task to end")

    logs = {path.name: path.read_text() for path in tmp_path.glob("task-*.log")}
    assert any("CANCELLED" in text for name, text in logs.items() if name.startswith(f"task-{array}_1")), logs
    assert any(
        "DUE TO TIME LIMIT" in text for name, text in logs.items() if name.startswith(f"task-{limited}")
    ), logs
    assert len(trials("COMPLETE")) == target and not trials("RUNNING")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    client = MlflowClient(mlflow_server.url)
    assert len(net_runs(client, CAMPAIGN, "FINISHED")) == target
    assert not net_runs(client, CAMPAIGN, "RUNNING")
    stopped = trials("FAIL")
    assert stopped, "neither the cancel nor the time limit caught a net"  # both tasks trained nets
    retried = {n for t in trials("COMPLETE") for n in t.system_attrs.get("retry_history", ())}
    for trial in stopped:
        run_id = trial.user_attrs.get("mlflow_run_id")
        if run_id:
            assert client.get_run(run_id).info.status in ("KILLED", "FAILED"), trial.number
        if trial.params:  # its configuration was queued again and trained by another task
            assert trial.number in retried, (trial.number, sorted(retried))
