"""Runs and trials left RUNNING by a process that is gone (SIGKILL, an out-of-memory kill, a lost
node): found by the `nws.worker` tag (host:pid) that every run of a campaign carries, and the
`worker` attribute of its Optuna trials.

Nothing else ends them: MLflow has no heartbeat, and Optuna's heartbeat exists on RDB storages
only. A process of this host can be checked (its pid no longer exists); one of another host
cannot, so its runs are closed only when asked (`nws cleanup --all-hosts`). A resumed campaign
closes the orphans of its own campaign on this host before it trains; `nws cleanup`
(`nws.commands.cleanup`) lists them and closes them on demand.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nws.campaign.trials import fail_trial, optuna_state
from nws.processes import GONE, OTHER_HOST, UNKNOWN, worker_state
from nws.tracking.runs import end_failed_run
from nws.tracking.tags import TAG_CAMPAIGN, TAG_ROLE, TAG_SNAPSHOTS, TAG_WORKER, tag_equals

EMPTY = "FINISHED without complete snapshots"
EMPTY_REASON = (
    "ended FINISHED without complete snapshots (by MLflow's exit hook, or an nws before 2026-12-07): "
    "marked FAILED by cleanup"
)


@dataclass
class Entry:
    """A RUNNING run or trial of a campaign, and what became of it."""

    what: str  # "trial 3", "net run <id>", "campaign run <id>", ...
    worker: str
    state: str  # ALIVE, GONE, OTHER_HOST or UNKNOWN
    closed: bool = False

    def line(self, dry_run: bool) -> str:
        action = ("would be closed" if dry_run else "closed") if self.closed else "left running"
        return f"{self.what}: worker {self.worker or '?'} ({self.state}): {action}"


def _closes(state: str, all_hosts: bool) -> bool:
    return state == GONE or (all_hosts and state in (OTHER_HOST, UNKNOWN))


def close_orphans(
    study: Any, campaign: str, all_hosts: bool = False, dry_run: bool = False, *, experiment_ids: list[str]
) -> list[Entry]:
    """Every RUNNING trial of `study` (None: no study) and RUNNING MLflow run tagged with
    `campaign` in the experiments `experiment_ids`; those whose worker is gone (with `all_hosts`,
    also those of other hosts or of no known worker) are closed: a trial is failed and its
    configuration queued again (its net's run ends FAILED), a run ends FAILED with `nws.failure`
    naming the worker."""
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient()
    query = f"{tag_equals(TAG_CAMPAIGN, campaign)} and attributes.status = 'RUNNING'"
    runs = mlflow.search_runs(experiment_ids=experiment_ids, filter_string=query, output_format="list")
    entries = []
    if study is not None:
        for trial in study.get_trials(deepcopy=False, states=(optuna_state("RUNNING"),)):
            worker = trial.user_attrs.get("worker", "")
            entry = Entry(f"trial {trial.number}", worker, worker_state(worker))
            entry.closed = _closes(entry.state, all_hosts)
            if entry.closed and not dry_run:
                fail_trial(study, trial)  # its net's run too
            entries.append(entry)
    for run in runs:
        worker = run.data.tags.get(TAG_WORKER, "")
        role = run.data.tags.get(TAG_ROLE, "")
        entry = Entry(f"{role} run {run.info.run_id}".strip(), worker, worker_state(worker))
        entry.closed = _closes(entry.state, all_hosts)
        if entry.closed and not dry_run and client.get_run(run.info.run_id).info.status == "RUNNING":
            end_failed_run(client, run.info.run_id, "FAILED", _reason(worker, entry.state))
        entries.append(entry)
    return entries


def close_empty_net_runs(campaign: str, dry_run: bool = False, *, experiment_ids: list[str]) -> list[Entry]:
    """Net runs of `campaign` that are FINISHED without complete snapshots (no `nws.snapshots`
    tag): nws never ends a net so, but MLflow's exit hook did when recording a failure failed
    (a tracking server away), in versions before this check. Each is ended FAILED with the reason."""
    import mlflow
    from mlflow import MlflowClient

    query = (f"{tag_equals(TAG_CAMPAIGN, campaign)} and {tag_equals(TAG_ROLE, 'net')} and "
             f"attributes.status = 'FINISHED' and tags.`{TAG_SNAPSHOTS}` IS NULL")  # fmt: skip
    runs = mlflow.search_runs(experiment_ids=experiment_ids, filter_string=query, output_format="list")
    client = MlflowClient()
    entries = []
    for run in runs:
        entry = Entry(f"net run {run.info.run_id}", run.data.tags.get(TAG_WORKER, ""), EMPTY, closed=True)
        if not dry_run:
            end_failed_run(client, run.info.run_id, "FAILED", EMPTY_REASON)
        entries.append(entry)
    return entries


def _reason(worker: str, state: str) -> str:
    return (
        f"worker {worker} is gone"
        if state == GONE
        else f"closed by cleanup: worker {worker or '?'} ({state})"
    )
