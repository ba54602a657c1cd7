"""Everything that talks to MLflow about nets: the run of one net (params, tags, per-epoch
metrics, snapshot artifacts, training curve) and the campaign run above it.

A net run is FINISHED only after its artifacts are uploaded and tagged complete
(`nws.snapshots = complete`), so a query for complete nets never sees a half-written one.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import socket
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from nws import interrupts

# Tags a query can select on.
TAG_ROLE = "nws.role"  # "net" or "campaign"
TAG_SUBSET = "nws.subset"
TAG_CAMPAIGN = "nws.campaign"
TAG_STUDY = "optuna.study"
TAG_TRIAL = "optuna.trial_number"
TAG_SEED = "nws.seed"
TAG_WORKER = "nws.worker"
"""host:pid of the process that trained the net (the Optuna trial's `worker` attribute too)."""
TAG_SNAPSHOTS = "nws.snapshots"  # "complete" once the artifacts are all there
TAG_WEIGHTS_DIGEST = "nws.weights_xxh3"  # xxh3-128 of the weights.npy array data
TAG_WEIGHTS_SHAPE = "nws.weights_shape"
TAG_FAILURE = "nws.failure"
TAG_STOP_REASON = "nws.stop_reason"
TAG_SPLIT = "nws.split"  # "train" or "test" when a net comes with a published split
SNAPSHOTS_COMPLETE = "complete"

WEIGHTS_ARTIFACT = "snapshots/weights.npy"
LAYOUT_ARTIFACT = "snapshots/layout.json"
HISTORY_ARTIFACT = "history.csv"
CURVE_ARTIFACT = "training_curve.png"

EPOCH_METRICS = (
    "train_accuracy",
    "valid_accuracy",
    "test_accuracy",
    "loss",
    "valid_loss",
    "test_loss",
    "valid_accuracy_smoothed",
)


def _mlflow() -> Any:
    import mlflow

    return mlflow


def check_tracking_server(timeout: float = 5.0) -> None:
    """Fail within seconds, in one line, when an `mlflow server` tracking URI does not answer
    (MLflow's own client would retry for minutes)."""
    import urllib.error
    import urllib.request

    from nws.errors import NWSError

    uri = _mlflow().get_tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as response:
            if response.status == 200:
                return
            reason = f"HTTP {response.status}"
    except (urllib.error.URLError, OSError) as e:
        reason = str(getattr(e, "reason", e))
    raise NWSError(f"MLflow tracking server {uri} is unreachable: {reason}")


@contextlib.contextmanager
def parent_run(
    tags: Mapping[str, str] | None = None,
    params: Mapping[str, Any] | None = None,
    run_name: str | None = None,
    nested: bool = False,
) -> Iterator[Any]:
    """The run an entry point works in (a campaign's, `train`'s, `main`'s, an import's), with
    one rule for how it ends: KILLED on an interrupt, FAILED on an error (its reason in
    `nws.failure`), FINISHED otherwise.

    It continues the run already active in this process (a caller's, e.g. `main`'s nested runs),
    and leaves ending that one to its owner; otherwise it starts one (inside `mlflow run` that
    resumes the project run, which `mlflow run` would end FAILED on an interrupt and MLflow's
    exit hook FINISHED) and ends it here. `nested` always starts a new run under the active one.
    The run is tagged with this process (`nws.worker`), so one left RUNNING by a killed process
    can be told from a live one. Params the run already holds (MLproject parameters) are not
    logged again. A stop while the run is made is held until it is known here.
    """
    mlflow = _mlflow()
    with interrupts.deferred():
        run = None if nested else mlflow.active_run()
        owned = run is None
        if owned:
            run = mlflow.start_run(run_name=run_name, nested=nested)
    run_id = run.info.run_id
    try:
        mlflow.set_tags({**(tags or {}), TAG_WORKER: worker_name()})
        if params:
            existing = mlflow.get_run(run_id).data.params
            mlflow.log_params({k: v for k, v in params.items() if k not in existing})
        yield run
        if owned:
            end_active_run(run_id, "FINISHED")
    except BaseException as error:  # Ctrl-C included
        if owned:
            abort_run(run_id, error)
        raise


def worker_name(pid: int | None = None) -> str:
    """host:pid, how trials and runs name the process that made them."""
    return f"{socket.gethostname()}:{pid or os.getpid()}"


def start_net_run(
    run_name: str, tags: Mapping[str, str], params: Mapping[str, Any], parent_run_id: str | None = None
) -> str:
    """A run for one net, nested under the active campaign run (or the given parent run, for the
    worker processes of a campaign whose run lives in another process); returns its id. A stop
    signal while it is being made ends it KILLED, never leaves it RUNNING."""
    mlflow = _mlflow()
    run_id = ""
    try:
        with interrupts.deferred():  # until its id is known here
            if parent_run_id:
                run = mlflow.start_run(run_name=run_name, parent_run_id=parent_run_id, tags=dict(tags))
            else:
                run = mlflow.start_run(run_name=run_name, nested=True, tags=dict(tags))
            run_id = run.info.run_id
        mlflow.log_params(dict(params))
    except BaseException as error:  # Ctrl-C included
        if run_id:
            abort_run(run_id, error)
        raise
    return run_id


def log_epoch(epoch: int, metrics: Mapping[str, float]) -> None:
    """Per-epoch metrics (step = epoch), one batch per epoch.

    Synchronous on purpose: a batch costs milliseconds, while MLflow's asynchronous queue costs
    up to a second per flush (it polls with a one-second timeout), which small nets feel.
    """
    values = {k: float(metrics[k]) for k in EPOCH_METRICS if k in metrics}
    _mlflow().log_metrics({k: v for k, v in values.items() if math.isfinite(v)}, step=epoch)


def weights_digest(weights: np.ndarray) -> str:
    """The integrity digest of a snapshot array's data: xxh3-128, fast enough (over 10 GB/s) that
    verifying a zoo costs less than reading it; an integrity check, not a security boundary."""
    import xxhash

    return xxhash.xxh3_128(memoryview(np.ascontiguousarray(weights)).cast("B")).hexdigest()


def log_net_result(
    weights: np.ndarray,
    layout: Mapping[str, Any],
    history: list[dict[str, float]],
    final_metrics: Mapping[str, float],
    tags: Mapping[str, str],
) -> None:
    """Upload the active run's artifacts, then its final metrics, tags and the completion tag
    (MLflow writes a batch's tags after its params and metrics, so the tag comes last)."""
    from mlflow import MlflowClient

    client, run = MlflowClient(), _mlflow().active_run()
    upload_net_artifacts(client, run.info.run_id, run.info.artifact_uri, weights, layout, history)
    for batch in _batches(*net_result_entities(weights, history, final_metrics, tags)):
        client.log_batch(run.info.run_id, **batch)


def upload_net_artifacts(
    client: Any,
    run_id: str,
    artifact_uri: str,
    weights: np.ndarray,
    layout: Mapping[str, Any],
    history: list[dict[str, float]],
    curve: bool = True,
) -> None:
    """The snapshots (float32), their layout, the history table and (unless `curve=False`) the
    training-curve picture of a run. A local artifact store gets them written in place: what
    `log_artifacts` would copy there, without a temporary copy of a net's megabytes (a third of
    a bulk import's time); any other store through the client."""
    from mlflow.utils.file_utils import local_file_uri_to_path
    from mlflow.utils.uri import is_local_uri

    if is_local_uri(artifact_uri, is_tracking_or_registry_uri=False):
        _write_artifacts(Path(local_file_uri_to_path(artifact_uri)), weights, layout, history, curve)
        return
    with tempfile.TemporaryDirectory(prefix="nws-artifacts-") as tmp:
        _write_artifacts(Path(tmp), weights, layout, history, curve)
        client.log_artifacts(run_id, tmp)


def _write_artifacts(
    root: Path, weights: np.ndarray, layout: Mapping[str, Any], history: list[dict[str, float]], curve: bool
) -> None:
    import pandas as pd

    (root / "snapshots").mkdir(parents=True, exist_ok=True)
    np.save(root / WEIGHTS_ARTIFACT, weights.astype(np.float32, copy=False))
    (root / LAYOUT_ARTIFACT).write_text(json.dumps(layout, indent=1))
    frame = pd.DataFrame(history)
    frame.to_csv(root / HISTORY_ARTIFACT, index=False)
    if curve:
        (root / CURVE_ARTIFACT).write_bytes(training_curve_png(frame))


class NetEntities(NamedTuple):
    """What a finished net logs besides its artifacts, as MLflow entities."""

    metrics: list[Any]
    params: list[Any]
    tags: list[Any]


def net_result_entities(
    weights: np.ndarray,
    history: list[dict[str, float]],
    final_metrics: Mapping[str, float],
    tags: Mapping[str, str],
    params: Mapping[str, Any] | None = None,
    epoch_metrics: bool = False,
) -> NetEntities:
    """Final metrics, tags with the weights' digest and the completion tag; with `params`, and
    with `epoch_metrics` the history as per-epoch metrics, for a net logged all at once (import)."""
    from mlflow.entities import Metric, Param, RunTag

    now = int(time.time() * 1000)
    all_tags = {
        **tags,
        TAG_WEIGHTS_DIGEST: weights_digest(weights),
        TAG_WEIGHTS_SHAPE: "x".join(str(n) for n in weights.shape),
        TAG_SNAPSHOTS: SNAPSHOTS_COMPLETE,
    }
    metrics = _history_metrics(history, now) if epoch_metrics else []
    metrics += [Metric(k, float(v), now, 0) for k, v in final_metrics.items()]
    return NetEntities(
        metrics,
        [Param(k, str(v)) for k, v in (params or {}).items()],
        [RunTag(k, str(v)) for k, v in all_tags.items()],
    )


def create_net_run(
    client: Any, tracking_uri: str, experiment_id: str, run_name: str, tags: Mapping[str, str]
) -> tuple[str, str]:
    """A RUNNING run for a net written all at once (import): (run id, artifact URI). On a
    database store in one transaction (`sql_tracking`); elsewhere through the client."""
    from nws import sql_tracking

    if sql_tracking.is_database_uri(tracking_uri):
        return sql_tracking.create_run(tracking_uri, experiment_id, run_name, tags)
    run = client.create_run(experiment_id, run_name=run_name, tags=dict(tags))
    return run.info.run_id, run.info.artifact_uri


def finish_net_run(client: Any, tracking_uri: str, run_id: str, entities: NetEntities) -> None:
    """Log a net's entities and end its run FINISHED. On a database store: in one transaction
    (`sql_tracking`, 3-4x faster than MLflow's `log_batch`, and never half-written); elsewhere
    (an `mlflow server`): `log_batch` with the completion tag in the last batch, then the end."""
    from nws import sql_tracking

    if sql_tracking.is_database_uri(tracking_uri):
        sql_tracking.finish_run(tracking_uri, run_id, *entities)
    else:
        finish_through_client(client, run_id, entities)


def finish_through_client(client: Any, run_id: str, entities: NetEntities) -> None:
    """`finish_net_run` on any store: MLflow's batches, the completion tag in the last one."""
    for batch in _batches(*entities):
        client.log_batch(run_id, **batch)
    client.set_terminated(run_id, "FINISHED")


def _history_metrics(history: list[dict[str, float]], timestamp: int) -> list[Any]:
    from mlflow.entities import Metric

    return [
        Metric(name, float(row[name]), timestamp, int(row["epoch"]))
        for row in history
        for name in EPOCH_METRICS
        if name in row and math.isfinite(float(row[name]))
    ]


def _batches(metrics: list[Any], params: list[Any], tags: list[Any]) -> Iterator[dict[str, list[Any]]]:
    """MLflow's batch limits, with params and tags (the completion tag) in the last batch."""
    from mlflow.utils.validation import (
        MAX_ENTITIES_PER_BATCH,
        MAX_METRICS_PER_BATCH,
        MAX_PARAMS_TAGS_PER_BATCH,
    )

    if len(params) > MAX_PARAMS_TAGS_PER_BATCH or len(tags) > MAX_PARAMS_TAGS_PER_BATCH:
        raise ValueError("more params or tags than one MLflow batch holds")
    room = min(MAX_METRICS_PER_BATCH, MAX_ENTITIES_PER_BATCH - len(params) - len(tags))
    lead = max(0, len(metrics) - room)
    for start in range(0, lead, MAX_METRICS_PER_BATCH):
        yield {"metrics": metrics[start : min(start + MAX_METRICS_PER_BATCH, lead)]}
    yield {"metrics": metrics[lead:], "params": params, "tags": tags}


def training_curve_png(history: Any) -> bytes:
    """Accuracy and loss per epoch, as the original's error plot (in accuracy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = [c for c in ("loss", "valid_loss", "test_loss") if c in history]
    fig, axes = plt.subplots(1, 2 if losses else 1, figsize=(11 if losses else 6, 4), squeeze=False)
    acc = axes[0][0]
    for column, style in (
        ("train_accuracy", "r--"),
        ("valid_accuracy", "r-"),
        ("test_accuracy", "g-"),
        ("valid_accuracy_smoothed", "b-"),
    ):
        if column in history:
            acc.plot(history["epoch"], history[column], style, label=column)
    panels = [(acc, "accuracy")]
    if losses:  # published nets record errors only
        loss = axes[0][1]
        for column, style in zip(losses, ("r--", "r-", "g-"), strict=False):
            loss.plot(history["epoch"], history[column], style, label=column)
        panels.append((loss, "loss"))
    for ax, label in panels:
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(True)
        ax.legend(fontsize="small")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    return buffer.getvalue()


def end_run(status: str = "FINISHED", tags: Mapping[str, str] | None = None) -> None:
    mlflow = _mlflow()
    if tags:
        mlflow.set_tags(dict(tags))
    mlflow.end_run(status=status)


def abort_run(run_id: str, error: BaseException) -> None:
    """End a run KILLED (Ctrl-C) or FAILED, with the error as `nws.failure`, by its id.

    `mlflow.end_run` takes the run off the active-run stack before it writes the end: a Ctrl-C in
    that write left the run RUNNING, and ending "the active run" again would then have ended its
    parent instead. So the end is written by id, and the stack is popped only while the run is
    still on top.
    """
    from mlflow import MlflowClient

    status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
    end_failed_run(MlflowClient(), run_id, status, error_text(error))
    active = _mlflow().active_run()
    if active is not None and active.info.run_id == run_id:
        _mlflow().end_run(status)


def end_active_run(run_id: str, status: str) -> None:
    """End a run by id, then take it off the active-run stack (see `abort_run`)."""
    from mlflow import MlflowClient

    MlflowClient().set_terminated(run_id, status)
    active = _mlflow().active_run()
    if active is not None and active.info.run_id == run_id:
        _mlflow().end_run(status)


def end_failed_run(client: Any, run_id: str, status: str, failure: str) -> None:
    """End a run by id as FAILED or KILLED, its reason in `nws.failure` first (a run never ends
    failed without its reason)."""
    client.set_tag(run_id, TAG_FAILURE, failure[:500])
    client.set_terminated(run_id, status)


def error_text(error: BaseException) -> str:
    """An error as `nws.failure` holds it."""
    return f"{type(error).__name__}: {error}"
