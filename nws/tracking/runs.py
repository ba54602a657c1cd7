"""How nws's MLflow runs begin and end: the run an entry point works in (`parent_run`, one rule
for every entry point), the run of one net (started, fed per-epoch metrics, ended or aborted),
and a run failed by id with its reason. Tag names come from `nws.tracking.tags`; what a net run
uploads, from `nws.tracking.artifacts`.

A run never ends failed without its reason (`nws.failure`), and a stop signal while a run is made
is held until its id is known, so a stop never leaves a run RUNNING behind.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from typing import Any

from nws import interrupts
from nws.processes import worker_name
from nws.tracking.tags import EPOCH_METRICS, TAG_FAILURE, TAG_WORKER


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


def log_epoch(epoch: int, metrics: Mapping[str, float], run_id: str = "") -> None:
    """Per-epoch metrics (step = epoch), one batch per epoch, to the active run or to `run_id`
    (a packed net, whose run is active in another thread).

    Synchronous on purpose: a batch costs milliseconds, while MLflow's asynchronous queue costs
    up to a second per flush (it polls with a one-second timeout), which small nets feel.
    """
    values = {k: float(metrics[k]) for k in EPOCH_METRICS if k in metrics}
    finite = {k: v for k, v in values.items() if math.isfinite(v)}
    if not run_id:
        _mlflow().log_metrics(finite, step=epoch)
        return
    import time

    from mlflow import MlflowClient
    from mlflow.entities import Metric

    stamp = int(time.time() * 1000)
    MlflowClient().log_batch(run_id, metrics=[Metric(k, v, stamp, epoch) for k, v in finite.items()])


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


def fail_net_run(run_id: str, reason: str) -> bool:
    """Mark a net's run FAILED with the reason, unless it already ended FAILED or KILLED.

    For a net whose trial did not complete: a RUNNING run of a dead worker, or a FINISHED one
    whose worker stopped (or was taken over) before its trial was told. Its configuration is
    trained again, so the run must not count as finished.
    """
    from mlflow import MlflowClient

    client = MlflowClient()
    if client.get_run(run_id).info.status not in ("RUNNING", "FINISHED"):
        return False
    end_failed_run(client, run_id, "FAILED", reason)
    return True
