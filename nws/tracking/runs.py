"""How nws's MLflow runs begin and end: the run an entry point works in (`parent_run`, one rule
for every entry point), the run of one net (started, fed per-epoch metrics, ended or aborted),
and a run failed by id with its reason. Tag names come from `nws.tracking.tags`; what a net run
uploads, from `nws.tracking.artifacts`.

A run never ends failed without its reason (`nws.failure`), and a stop signal while a run is made
is held until its id is known, so a stop never leaves a run RUNNING behind.
"""

from __future__ import annotations

import atexit
import contextlib
import math
from collections.abc import Iterator, Mapping
from typing import Any

from nws import interrupts
from nws.processes import worker_name
from nws.tracking.experiments import working_experiment
from nws.tracking.tags import EPOCH_METRICS, TAG_FAILURE, TAG_WORKER


def _mlflow() -> Any:
    import mlflow

    return mlflow


LEFT_ACTIVE = "the process ended before nws ended this run"
_owned: dict[str, None] = {}
"""Runs nws started in this process and has not ended yet, in the order they started."""


def _own(run_id: str) -> None:
    """Keep `run_id` until nws ends it. The first time, register the exit hook that ends what is
    left FAILED: registered after MLflow's own (which ends the active run FINISHED), it runs first."""
    if not _owned and not getattr(_own, "hooked", False):
        _mlflow()  # MLflow's hook is registered when it is imported
        atexit.register(end_runs_left_active)
        _own.hooked = True  # type: ignore[attr-defined]
    _owned[run_id] = None


def end_runs_left_active() -> list[str]:
    """End FAILED, with the reason, every run nws started here and did not end (a write of its end
    that failed, a path out of a run that nothing closed), and take them off MLflow's active-run
    stack, so that MLflow's exit hook cannot end them FINISHED. Returns their ids."""
    from mlflow import MlflowClient

    left = list(reversed(_owned))  # nested runs first, as they sit on the stack
    for run_id in left:
        with contextlib.suppress(Exception):  # the server may still be away: the run stays RUNNING
            if MlflowClient().get_run(run_id).info.status == "RUNNING":
                end_failed_run(MlflowClient(), run_id, "FAILED", LEFT_ACTIVE)
        _take_off_stack(run_id, "FAILED")
        _owned.pop(run_id, None)
    return left


def _take_off_stack(run_id: str, status: str) -> None:
    """Take `run_id` off MLflow's active-run stack while it is on top. MLflow pops before it
    writes the end, so a failed write still leaves the stack without it."""
    mlflow = _mlflow()
    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        with contextlib.suppress(Exception):
            mlflow.end_run(status)


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
    experiment: str = "",
) -> Iterator[Any]:
    """The run an entry point works in (a campaign's, `train`'s, `main`'s, an import's), with
    one rule for how it ends: KILLED on an interrupt, FAILED on an error (its reason in
    `nws.failure`), FINISHED otherwise.

    It continues the run already active in this process (a caller's, e.g. `main`'s nested runs),
    and leaves ending that one to its owner; otherwise it starts one (inside `mlflow run` that
    resumes the project run, which `mlflow run` would end FAILED on an interrupt and MLflow's
    exit hook FINISHED) and ends it here. `nested` always starts a new run under the active one.
    A new run goes to the working experiment (`nws.tracking.experiments`; `experiment` is the
    entry point's option), a nested one to its parent's.
    The run is tagged with this process (`nws.worker`), so one left RUNNING by a killed process
    can be told from a live one. Params the run already holds (MLproject parameters) are not
    logged again. A stop while the run is made is held until it is known here.
    """
    mlflow = _mlflow()
    with interrupts.deferred():
        run = None if nested else mlflow.active_run()
        owned = run is None
        if owned:
            where = _experiment_for(experiment, nested)
            run = mlflow.start_run(run_name=run_name, nested=nested, experiment_id=where)
            _own(run.info.run_id)
        elif experiment.strip():
            working_experiment(experiment)  # refuses an experiment other than the active run's
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


def _experiment_for(option: str, nested: bool) -> str:
    """Where a new run goes: a nested run beside its parent, any other by the working rule."""
    if nested:
        active = _mlflow().active_run()
        if active is not None:
            return active.info.experiment_id
    return working_experiment(option)


def start_net_run(
    run_name: str,
    tags: Mapping[str, str],
    params: Mapping[str, Any],
    parent_run_id: str | None = None,
    dataset: tuple[Any, Mapping[str, str]] | None = None,
) -> str:
    """A run for one net, nested under the active campaign run (or the given parent run, for the
    worker processes of a campaign whose run lives in another process); returns its id. A stop
    signal while it is being made ends it KILLED, never leaves it RUNNING. `dataset` (an MLflow
    dataset and the input's tags, `nws.tracking.datasets`) becomes its training input."""
    mlflow = _mlflow()
    run_id = ""
    try:
        with interrupts.deferred():  # until its id is known here
            where = working_experiment(parent_run_id=parent_run_id or "")
            if parent_run_id:
                run = mlflow.start_run(
                    run_name=run_name, parent_run_id=parent_run_id, tags=dict(tags), experiment_id=where
                )
            else:
                run = mlflow.start_run(run_name=run_name, nested=True, tags=dict(tags), experiment_id=where)
            run_id = run.info.run_id
            _own(run_id)
        mlflow.log_params(dict(params))
        if dataset is not None:
            from nws.tracking.datasets import log_input

            log_input(dataset[0], dataset[1], run_id)
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
    """End the active run (a net's) with `status`, after its tags."""
    mlflow = _mlflow()
    run_id = mlflow.active_run().info.run_id
    if tags:
        mlflow.set_tags(dict(tags))
    mlflow.end_run(status=status)  # off the stack first: a failed write leaves it RUNNING, not ours
    _owned.pop(run_id, None)


def abort_run(run_id: str, error: BaseException) -> None:
    """End a run KILLED (Ctrl-C) or FAILED, with the error as `nws.failure`, by its id.

    `mlflow.end_run` takes the run off the active-run stack before it writes the end: a Ctrl-C in
    that write left the run RUNNING, and ending "the active run" again would then have ended its
    parent instead. So the end is written by id, and the stack is popped only while the run is
    still on top, whether the write worked or not: left on the stack, MLflow's exit hook would end
    it FINISHED once its server answers again. A write that failed leaves the run to the exit
    hook (`end_runs_left_active`) and to `nws cleanup`.
    """
    from mlflow import MlflowClient

    status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
    try:
        end_failed_run(MlflowClient(), run_id, status, error_text(error))
        _owned.pop(run_id, None)
    finally:
        _take_off_stack(run_id, status)


def end_active_run(run_id: str, status: str) -> None:
    """End a run by id, then take it off the active-run stack (see `abort_run`)."""
    from mlflow import MlflowClient

    MlflowClient().set_terminated(run_id, status)
    _owned.pop(run_id, None)
    _take_off_stack(run_id, status)


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
