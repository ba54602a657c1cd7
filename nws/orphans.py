"""Runs and trials left RUNNING by a process that is gone (SIGKILL, an out-of-memory kill, a lost
node): found by the `nws.worker` tag (host:pid) that every run of a campaign carries, and the
`worker` attribute of its Optuna trials.

Nothing else ends them: MLflow has no heartbeat, and Optuna's heartbeat exists on RDB storages
only. A process of this host can be checked (its pid no longer exists); one of another host
cannot, so its runs are closed only when asked (`nws cleanup --all-hosts`). A resumed campaign
closes the orphans of its own campaign on this host before it trains; `nws cleanup` lists them
and closes them on demand.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nws.params import param
from nws.sampling import DEFAULT_STORAGE

ALIVE = "alive"
GONE = "gone"
OTHER_HOST = "other host"
UNKNOWN = "unknown worker"


@dataclass(frozen=True)
class CleanupOptions:
    """The parameters of the `cleanup` entry point."""

    campaign: str = param("default", "the campaign whose runs and trials to check")
    storage: str = param(
        "", f"its Optuna storage: an RDB URL or a journal file (default ./{DEFAULT_STORAGE})"
    )
    dry_run: bool = param(False, "only list the RUNNING runs and trials, close nothing")
    all_hosts: bool = param(
        False, "also close those of other hosts and of no known worker (their processes cannot be checked)"
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


def process_is_gone(pid: int) -> bool:
    """Whether no process of this machine has this pid."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def worker_state(worker: str) -> str:
    """What can be said of a host:pid worker from here: ALIVE or GONE on this host, else
    OTHER_HOST, or UNKNOWN when there is no such name."""
    host, _, pid = worker.rpartition(":")
    if not host or not pid.isdigit():
        return UNKNOWN
    if host != socket.gethostname():
        return OTHER_HOST
    return GONE if process_is_gone(int(pid)) else ALIVE


def _closes(state: str, all_hosts: bool) -> bool:
    return state == GONE or (all_hosts and state in (OTHER_HOST, UNKNOWN))


def close_orphans(study: Any, campaign: str, all_hosts: bool = False, dry_run: bool = False) -> list[Entry]:
    """Every RUNNING trial of `study` (None: no study) and RUNNING MLflow run tagged with
    `campaign`; those whose worker is gone (with `all_hosts`, also those of other hosts or of no
    known worker) are closed: a trial is failed and its configuration queued again (its net's run
    ends FAILED), a run ends FAILED with `nws.failure` naming the worker."""
    import mlflow
    from mlflow import MlflowClient

    from nws import tracking
    from nws.sampling import fail_trial, optuna_state

    client = MlflowClient()
    query = f"tags.`{tracking.TAG_CAMPAIGN}` = '{campaign}' and attributes.status = 'RUNNING'"
    runs = mlflow.search_runs(search_all_experiments=True, filter_string=query, output_format="list")
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
        worker = run.data.tags.get(tracking.TAG_WORKER, "")
        role = run.data.tags.get(tracking.TAG_ROLE, "")
        entry = Entry(f"{role} run {run.info.run_id}".strip(), worker, worker_state(worker))
        entry.closed = _closes(entry.state, all_hosts)
        if entry.closed and not dry_run and client.get_run(run.info.run_id).info.status == "RUNNING":
            tracking.end_failed_run(client, run.info.run_id, "FAILED", _reason(worker, entry.state))
        entries.append(entry)
    return entries


def _reason(worker: str, state: str) -> str:
    return (
        f"worker {worker} is gone"
        if state == GONE
        else f"closed by cleanup: worker {worker or '?'} ({state})"
    )


def _study(options: CleanupOptions) -> Any:
    """The campaign's study, or None where the storage holds none (a journal file that does not
    exist is not created)."""
    import optuna

    from nws.sampling import open_storage

    url = options.storage.strip() or DEFAULT_STORAGE
    if "://" not in url and not Path(url.removeprefix("journal:")).expanduser().is_file():
        return None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.load_study(study_name=options.campaign, storage=open_storage(url))
    except KeyError:
        return None


def run_cleanup(options: CleanupOptions) -> list[Entry]:
    """List a campaign's RUNNING runs and trials, close those whose process is gone."""
    from nws.errors import ParameterError
    from nws.tracking import check_tracking_server

    if not options.campaign.strip():
        raise ParameterError("campaign", "must not be empty")
    check_tracking_server()
    study = _study(options)
    if study is None:
        where = options.storage.strip() or DEFAULT_STORAGE
        print(
            f"no Optuna study {options.campaign!r} in {where}: only MLflow runs are checked", file=sys.stderr
        )
    entries = close_orphans(study, options.campaign, options.all_hosts, options.dry_run)
    for entry in entries:
        print(entry.line(options.dry_run))
    closed = sum(e.closed for e in entries)
    verb = "would be closed" if options.dry_run else "closed"
    left = len(entries) - closed
    print(f"campaign {options.campaign}: {len(entries)} running, {closed} {verb}, {left} left running")
    return entries
