"""Which MLflow experiment nws's runs go to and its queries look in: one rule for every entry point.

MLflow's own default, the experiment "Default", mixes the study with everything else and opens the
UI on nothing in particular, so nws works in a named experiment, first match wins:

1. the run already active: the project run that `mlflow run` made (`MLFLOW_RUN_ID`; choose its
   experiment with `mlflow run --experiment-name`), or the run a worker nests its nets under.
   An `experiment` option naming another experiment is refused: a run cannot move;
2. the entry point's `experiment` option;
3. `MLFLOW_EXPERIMENT_NAME`, then `MLFLOW_EXPERIMENT_ID` (MLflow's own order; both set must agree);
4. `nws`.

A named experiment that does not exist is created. Nothing here sets MLflow's process-wide active
experiment: the id is passed to `start_run`, so a later call with another tracking store (a test,
a second study in one process) starts from the rule again.
"""

from __future__ import annotations

import os
from typing import Any

from nws.errors import ParameterError
from nws.tracking.tags import EXPERIMENT_KIND, TAG_EXPERIMENT_KIND

DEFAULT_EXPERIMENT = "nws"
ALL_EXPERIMENTS = "*"
"""The selection value that means every experiment of the store."""


def _client() -> Any:
    from mlflow import MlflowClient

    return MlflowClient()


def get_or_create(name: str) -> str:
    """The id of the active experiment `name`, created when missing (a worker that lost the race
    to create it reads the winner's), tagged as model training for MLflow's UI
    (`mlflow.experimentKind`), unless it already says what it is."""
    from mlflow.exceptions import MlflowException

    client = _client()
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, tags={TAG_EXPERIMENT_KIND: EXPERIMENT_KIND})
        except MlflowException:
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage != "active":
        raise ParameterError(
            "experiment", f"MLflow experiment {name!r} is deleted (restore it or pick another)"
        )
    if TAG_EXPERIMENT_KIND not in experiment.tags:  # made by an earlier nws, or by MLflow itself
        client.set_experiment_tag(experiment.experiment_id, TAG_EXPERIMENT_KIND, EXPERIMENT_KIND)
    return experiment.experiment_id


def _running_run() -> Any:
    """The run this process already works in: the active one, or the one `mlflow run` made."""
    import mlflow

    active = mlflow.active_run()
    if active is not None:
        return active
    run_id = os.environ.get("MLFLOW_RUN_ID", "").strip()
    return _client().get_run(run_id) if run_id else None


def _from_environment() -> str | None:
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "").strip()
    given_id = os.environ.get("MLFLOW_EXPERIMENT_ID", "").strip()
    if name:
        found = get_or_create(name)
        if given_id and given_id != found:
            raise ParameterError(
                "experiment",
                f"MLFLOW_EXPERIMENT_ID={given_id} is not the experiment named by "
                f"MLFLOW_EXPERIMENT_NAME={name!r} ({found})",
            )
        return found
    if given_id:
        from mlflow.exceptions import MlflowException

        try:
            return _client().get_experiment(given_id).experiment_id
        except MlflowException:
            raise ParameterError(
                "experiment", f"MLFLOW_EXPERIMENT_ID={given_id}: no such experiment"
            ) from None
    return None


def working_experiment(option: str = "", parent_run_id: str = "") -> str:
    """The id of the experiment this process's runs go to (the rule in this module's docstring);
    `parent_run_id`: a run of another process that the runs nest under."""
    running = _client().get_run(parent_run_id) if parent_run_id else _running_run()
    if running is not None:
        experiment_id = running.info.experiment_id
        if option.strip():
            named = _client().get_experiment_by_name(option.strip())
            if named is None or named.experiment_id != experiment_id:
                current = _client().get_experiment(experiment_id).name
                raise ParameterError(
                    "experiment",
                    f"{option.strip()!r}: this process already works in run {running.info.run_id} of "
                    f"experiment {current!r}; with mlflow run, choose it with --experiment-name",
                )
        return experiment_id
    if option.strip():
        return get_or_create(option.strip())
    return _from_environment() or get_or_create(DEFAULT_EXPERIMENT)


def existing_run(option: str, run_id: str) -> Any:
    """The run `run_id`, or one line naming the option when the tracking store has none such."""
    from mlflow.exceptions import MlflowException

    try:
        return _client().get_run(run_id)
    except MlflowException:
        raise ParameterError(option, f"no run {run_id} in the tracking store {_tracking_uri()}") from None


def existing_experiment(option: str) -> str:
    """The id of the experiment named by `option` (or the working one when empty), refused in
    one line when no such experiment exists: a command that only looks must not create one."""
    name = option.strip()
    if not name:
        return working_experiment()
    found = _client().get_experiment_by_name(name)
    if found is None:
        raise ParameterError("experiment", f"no experiment named {name!r} in {_tracking_uri()}")
    return found.experiment_id


def _tracking_uri() -> str:
    import mlflow

    return mlflow.get_tracking_uri()


def experiment_name(experiment_id: str) -> str:
    return _client().get_experiment(experiment_id).name
