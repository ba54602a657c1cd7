"""Creating and finishing runs in one transaction each, straight into MLflow's own SQL store.

Why: MLflow's client does per-entity ORM work in several sessions and commits. For one imported
net (about 165 per-epoch metrics, 16 params, 12 tags) `create_run`, `log_batch` and
`set_terminated` cost 50-60 ms of the import's ~100 ms per net, so a 16,000-net import spent
most of its time there. For a database tracking URI this module writes the same rows through
MLflow's own table definitions: the RUNNING run with its tags in one transaction, then the
metrics, params and tags with one multi-row INSERT per table and the end of the run in another,
a few milliseconds each. A net is either complete or still RUNNING, never half-written.

The rows are the ones MLflow's client writes (its validation, run name tag and artifact location,
its NaN and infinity encoding, its duplicate-metric and latest-metric rules, tag overwrites), for
the MLflow version the project pins; tests compare both ways through MLflow's client. The client
has opened the store first, which checks its schema revision. An `mlflow server` URI has no
database here: use the client.
"""

from __future__ import annotations

import functools
import math
import time
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlflow.entities import Metric, Param, RunTag

_MAX_FLOAT = 1.7976931348623157e308  # how MLflow stores an infinite metric (SQL has no inf)


def is_database_uri(uri: str) -> bool:
    """A tracking URI that MLflow opens as a SQL store (sqlite, postgresql, mysql, mssql)."""
    from mlflow.store.db.db_types import DATABASE_ENGINES

    scheme = uri.split(":", 1)[0].split("+", 1)[0].lower()
    return scheme in DATABASE_ENGINES


@functools.cache
def _engine(uri: str) -> Any:
    """One engine per process and store, with MLflow's pool settings and SQLite pragmas."""
    from mlflow.store.db.utils import create_sqlalchemy_engine
    from sqlalchemy import event

    engine = create_sqlalchemy_engine(uri)
    if uri.startswith("sqlite"):

        @event.listens_for(engine, "connect")
        def _pragmas(connection: Any, _record: Any) -> None:
            cursor = connection.cursor()
            cursor.execute("PRAGMA foreign_keys = ON")
            cursor.execute("PRAGMA busy_timeout = 20000")  # other workers hold the write lock
            cursor.close()

    return engine


def _stored(value: float) -> tuple[float, bool]:
    """(value, is_nan) as MLflow stores a metric value."""
    if math.isnan(value):
        return 0.0, True
    if math.isinf(value):
        return math.copysign(_MAX_FLOAT, value), False
    return value, False


class RunNotActive(RuntimeError):
    """The run was no longer RUNNING (ended or deleted by someone else): nothing was written."""


def create_run(uri: str, experiment_id: str, run_name: str, tags: Mapping[str, str]) -> tuple[str, str]:
    """A new RUNNING run with `tags` in an active experiment, as `MlflowClient.create_run`
    makes it: (run id, artifact URI)."""
    import sqlalchemy as sa
    from mlflow.exceptions import MlflowException
    from mlflow.store.tracking.dbmodels.models import SqlExperiment, SqlRun, SqlTag
    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME, MLFLOW_USER
    from mlflow.utils.uri import append_to_uri_path
    from mlflow.utils.validation import _validate_tag

    values = {**tags, MLFLOW_RUN_NAME: run_name}
    for key, value in values.items():
        _validate_tag(key, value)
    run_id = uuid.uuid4().hex
    experiments = SqlExperiment.__table__
    with _engine(uri).begin() as connection:
        experiment = connection.execute(
            sa.select(experiments.c.artifact_location, experiments.c.lifecycle_stage).where(
                experiments.c.experiment_id == int(experiment_id)
            )
        ).one_or_none()
        if experiment is None or experiment.lifecycle_stage != "active":
            raise MlflowException(f"experiment {experiment_id} does not exist or is not active")
        artifact_uri = append_to_uri_path(experiment.artifact_location, run_id, "artifacts")
        connection.execute(
            sa.insert(SqlRun.__table__),
            [{"run_uuid": run_id, "name": run_name, "artifact_uri": artifact_uri,
              "experiment_id": int(experiment_id), "source_type": "UNKNOWN", "source_name": "",
              "entry_point_name": "", "user_id": values.get(MLFLOW_USER, "unknown"), "status": "RUNNING",
              "start_time": int(time.time() * 1000), "end_time": None, "deleted_time": None,
              "source_version": "", "lifecycle_stage": "active"}],
        )  # fmt: skip
        connection.execute(sa.insert(SqlTag.__table__), _rows(run_id, values))
    return run_id, artifact_uri


def finish_run(
    uri: str,
    run_id: str,
    metrics: list[Metric],
    params: list[Param],
    tags: list[RunTag],
    status: str = "FINISHED",
) -> None:
    """Log metrics, params and tags to a RUNNING run and end it with `status`, atomically.

    Made for a run's one final write: its params must be new to it (MLflow refuses a param
    logged twice as well; here the database does, and nothing is written)."""
    import sqlalchemy as sa
    from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlMetric, SqlParam, SqlRun, SqlTag
    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME
    from mlflow.utils.validation import _validate_batch_log_data, _validate_param_keys_unique

    metrics, params, tags = _validate_batch_log_data(metrics, params, tags)
    _validate_param_keys_unique(params)
    rows: dict[tuple[Any, ...], dict[str, Any]] = {}  # MLflow drops exact duplicates
    latest: dict[str, dict[str, Any]] = {}
    for metric in metrics:
        value, is_nan = _stored(float(metric.value))
        row = {"run_uuid": run_id, "key": metric.key, "value": value, "is_nan": is_nan,
               "timestamp": int(metric.timestamp), "step": int(metric.step)}  # fmt: skip
        rows.setdefault((metric.key, row["timestamp"], row["step"], value, is_nan), row)
        best = latest.get(metric.key)
        order = (row["step"], row["timestamp"], value)  # MLflow's "more recent" rule
        if best is None or order > (best["step"], best["timestamp"], best["value"]):
            latest[metric.key] = row
    tag_values = {t.key: t.value for t in tags}  # the last value of a key wins
    runs = SqlRun.__table__
    with _engine(uri).begin() as connection:
        ended = connection.execute(
            sa.update(runs)
            .where(runs.c.run_uuid == run_id, runs.c.status == "RUNNING", runs.c.lifecycle_stage == "active")
            .values(status=status, end_time=int(time.time() * 1000))
        )
        if ended.rowcount != 1:
            raise RunNotActive(f"MLflow run {run_id} is not running")
        if MLFLOW_RUN_NAME in tag_values:
            connection.execute(
                sa.update(runs).where(runs.c.run_uuid == run_id).values(name=tag_values[MLFLOW_RUN_NAME])
            )
        if rows:
            connection.execute(sa.insert(SqlMetric.__table__), list(rows.values()))
            _merge_latest(connection, SqlLatestMetric.__table__, run_id, latest)
        if params:
            connection.execute(sa.insert(SqlParam.__table__), _rows(run_id, {p.key: p.value for p in params}))
        if tag_values:
            table = SqlTag.__table__
            connection.execute(
                sa.delete(table).where(table.c.run_uuid == run_id, table.c.key.in_(list(tag_values)))
            )
            connection.execute(sa.insert(table), _rows(run_id, tag_values))


def _rows(run_id: str, values: Mapping[str, str]) -> list[dict[str, str]]:
    """Key-value rows of a run (tags, params)."""
    return [{"run_uuid": run_id, "key": k, "value": v} for k, v in values.items()]


def _merge_latest(connection: Any, table: Any, run_id: str, latest: dict[str, dict[str, Any]]) -> None:
    """The latest value per key, counting what the run logged before (usually nothing)."""
    import sqlalchemy as sa

    where = (table.c.run_uuid == run_id, table.c.key.in_(list(latest)))
    for old in connection.execute(sa.select(table).where(*where)).mappings():
        new = latest[old["key"]]
        if (old["step"], old["timestamp"], old["value"]) >= (new["step"], new["timestamp"], new["value"]):
            latest[old["key"]] = dict(old)
    connection.execute(sa.delete(table).where(*where))
    connection.execute(sa.insert(table), list(latest.values()))
