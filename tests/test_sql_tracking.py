"""Creating and finishing a run in one transaction each writes exactly what MLflow's client
writes (create_run; log_batch then set_terminated), read back through the client, on SQLite and
PostgreSQL; a run that is not running, or an experiment that is not active, gets nothing."""

from __future__ import annotations

import math

import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from nws.tracking import sql as sql_tracking
from nws.tracking.sql import RunNotActive, create_run, finish_run, is_database_uri


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.slow)])
def store(request, tmp_path_factory):
    """One store per database for the module (each test makes its own runs)."""
    tmp = tmp_path_factory.mktemp(request.param)
    if request.param == "sqlite":
        uri = f"sqlite:///{tmp / 'mlflow.db'}"
    else:
        uri = request.getfixturevalue("postgres").database()
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("sql", artifact_location=str(tmp / "artifacts"))
    return uri, client, experiment


# Out of order on purpose: the latest value is the one with the highest step, then timestamp,
# then value; an exact duplicate is dropped; NaN and infinities are stored as MLflow stores them.
METRICS = [
    Metric("acc", 0.5, 1000, 3),
    Metric("acc", 0.1, 1000, 0),
    Metric("acc", 0.7, 900, 3),
    Metric("acc", 0.5, 1000, 3),
    Metric("acc", 0.2, 1000, 1),
    Metric("loss", float("nan"), 1000, 2),
    Metric("loss", 3.0, 1000, 1),
    Metric("big", float("inf"), 1000, 0),
    Metric("small", float("-inf"), 1000, 0),
    Metric("seen", 1.0, 500, 0),  # older than what the run logged before (step 9)
]
PARAMS = [Param("lrate", "0.001"), Param("optimizer", "adam")]
TAGS = [RunTag("kept", "new"), RunTag("added", "yes"), RunTag("mlflow.runName", "renamed")]


def new_run(client, experiment):
    run = client.create_run(experiment, run_name="net", tags={"kept": "old", "other": "x"})
    client.log_metric(run.info.run_id, "seen", 2.0, timestamp=100, step=9)
    return run.info.run_id


def history(client, run_id, key):
    return sorted(
        (m.step, m.timestamp, "nan" if math.isnan(m.value) else m.value)
        for m in client.get_metric_history(run_id, key)
    )


def test_finishing_in_one_transaction_writes_what_the_client_writes(store):
    uri, client, experiment = store
    by_client, by_sql = new_run(client, experiment), new_run(client, experiment)
    client.log_batch(by_client, metrics=METRICS, params=PARAMS, tags=TAGS)
    client.set_terminated(by_client, "FINISHED")
    finish_run(uri, by_sql, METRICS, PARAMS, TAGS)

    a, b = client.get_run(by_client), client.get_run(by_sql)
    assert (a.info.status, b.info.status) == ("FINISHED", "FINISHED")
    assert b.info.end_time >= b.info.start_time
    assert a.info.run_name == b.info.run_name == "renamed"
    assert a.data.params == b.data.params == {"lrate": "0.001", "optimizer": "adam"}
    assert a.data.tags == b.data.tags
    assert (b.data.tags["kept"], b.data.tags["other"], b.data.tags["added"]) == ("new", "x", "yes")
    latest_a, latest_b = a.data.metrics, b.data.metrics
    assert math.isnan(latest_a.pop("loss")) and math.isnan(latest_b.pop("loss"))
    assert latest_a == latest_b == {"acc": 0.5, "big": 1.7976931348623157e308,
                                    "small": -1.7976931348623157e308, "seen": 2.0}  # fmt: skip
    for key in ("acc", "loss", "big", "small", "seen"):
        assert history(client, by_client, key) == history(client, by_sql, key), key
    assert len(history(client, by_sql, "acc")) == 4  # the duplicate once
    found = client.search_runs([experiment], "metrics.acc = 0.5 and params.optimizer = 'adam'")
    assert {by_client, by_sql} <= {r.info.run_id for r in found}


@pytest.mark.parametrize(
    ("params", "error"),
    [
        (PARAMS, RunNotActive),  # the run was ended by someone else
        ([Param("bad\nkey", "1")], MlflowException),  # MLflow's own validation
        ([Param("lrate", "1"), Param("lrate", "2")], MlflowException),
    ],
)
def test_a_refused_finish_writes_nothing(store, params, error):
    uri, client, experiment = store
    run_id = new_run(client, experiment)
    if error is RunNotActive:
        client.set_terminated(run_id, "FAILED")
    with pytest.raises(error):
        finish_run(uri, run_id, METRICS, params, TAGS)
    run = client.get_run(run_id)
    assert run.info.status == ("FAILED" if error is RunNotActive else "RUNNING")
    assert run.data.metrics == {"seen": 2.0} and run.data.params == {}
    assert run.data.tags["kept"] == "old" and "added" not in run.data.tags


def test_creating_in_one_transaction_makes_the_run_the_client_makes(store, tmp_path):
    uri, client, experiment = store
    tags = {"nws.role": "net", "mlflow.user": "ana", "mlflow.parentRunId": "p" * 32}
    by_client = client.create_run(experiment, run_name="net-7", tags=tags).info.run_id
    by_sql, artifact_uri = create_run(uri, experiment, "net-7", tags)
    a, b = client.get_run(by_client), client.get_run(by_sql)
    assert b.info.artifact_uri == artifact_uri == a.info.artifact_uri.replace(by_client, by_sql)
    assert artifact_uri.endswith(f"/{by_sql}/artifacts") and len(by_sql) == 32
    for field in ("run_name", "status", "lifecycle_stage", "user_id", "experiment_id", "end_time"):
        assert getattr(a.info, field) == getattr(b.info, field), field
    assert (b.info.status, b.info.user_id, b.info.run_name) == ("RUNNING", "ana", "net-7")
    assert abs(a.info.start_time - b.info.start_time) < 60_000
    assert a.data.tags == b.data.tags and b.data.tags["mlflow.runName"] == "net-7"
    found = client.search_runs([experiment], "tags.`mlflow.parentRunId` = '" + "p" * 32 + "'")
    assert {by_client, by_sql} <= {r.info.run_id for r in found}
    finish_run(uri, by_sql, METRICS, PARAMS, [])
    assert client.get_run(by_sql).info.status == "FINISHED"

    gone = client.create_experiment(f"gone-{tmp_path.name}")
    client.delete_experiment(gone)
    with pytest.raises(MlflowException, match="not active"):
        create_run(uri, gone, "net-8", {})
    assert not client.search_runs([gone], run_view_type=3)  # ViewType.ALL


def test_which_uris_are_databases():
    assert is_database_uri("sqlite:///mlflow.db")
    assert is_database_uri("postgresql+psycopg://nws@db/mlflow")
    assert is_database_uri("mysql://u@h/m") and is_database_uri("mssql+pyodbc://u@h/m")
    assert not is_database_uri("http://127.0.0.1:5000")
    assert not is_database_uri("file:///tmp/mlruns") and not is_database_uri("databricks")
    assert sql_tracking._stored(float("nan")) == (0.0, True)
