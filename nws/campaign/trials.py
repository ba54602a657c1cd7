"""The trials of a campaign's study as every worker sees them: how many are finished, running or
queued; whether this worker should train another net; and what happens to the trial of a worker
that died (failed, its MLflow run marked FAILED, its configuration queued again).

Workers (processes, machines) coordinate through the study's storage only. On an RDB storage each
running trial sends Optuna heartbeats, and the trial of a worker that went silent is failed and
retried by Optuna's RetryHeartbeatStaleTrialCallback; on a journal file, which has no heartbeats, the
trials of this host's processes that are gone are failed here instead.
"""

from __future__ import annotations

import sys
import time
import warnings
from typing import Any

from nws import interrupts
from nws.processes import GONE, worker_of_this_host, worker_state
from nws.tracking.runs import fail_net_run

MAX_RETRIES = 2
TAKEN_OVER = "taken over: judged dead (missed heartbeats), its trial was retried elsewhere"


def optuna_state(name: str) -> Any:
    import optuna

    return getattr(optuna.trial.TrialState, name)


def fail_and_retry(study: Any, trial: Any) -> None:
    """A trial whose worker died: mark its MLflow run FAILED, then let Optuna's
    RetryHeartbeatStaleTrialCallback enqueue its configuration again."""

    run_id = trial.user_attrs.get("mlflow_run_id")
    try:
        if run_id:
            fail_net_run(run_id, f"worker {trial.user_attrs.get('worker')} died")
    except Exception as e:  # the retry matters more; the run stays not FINISHED either way
        print(f"could not mark MLflow run {run_id} FAILED: {type(e).__name__}: {e}", file=sys.stderr)
    finally:
        queue_again(study, trial)


def queue_again(study: Any, trial: Any) -> None:
    """Enqueue a failed trial's configuration again through Optuna's
    RetryHeartbeatStaleTrialCallback (at most `MAX_RETRIES` times per configuration)."""
    import optuna

    with warnings.catch_warnings():  # marked experimental; the old name is deprecated
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES)(study, trial)


def claim(trial: Any, worker: str) -> None:
    """Mark a trial this worker's, first of all. A retry inherits the stopped or dead worker's
    attributes: its name is replaced here, and its net's run id cleared until this worker's run
    starts (else a retry stopped before that would point at, and fail again, the old run)."""
    trial.set_user_attr("worker", worker)
    if trial.user_attrs.get("mlflow_run_id"):
        trial.set_user_attr("mlflow_run_id", "")


def end_interrupted(study: Any, current: dict[str, Any]) -> None:
    """After a stop signal ended the trial being trained (`current`: its "number" once asked,
    its "trial" and "run_id" once its run started): a net that finished in the moment before is
    not counted, and the trial's configuration is queued again."""
    if "trial" in current and trial_failed(study, current["trial"]):
        fail_net_run(current["run_id"], "interrupted before its trial was told")
    if "number" in current:
        retry_interrupted(study, current["number"])


def retry_interrupted(study: Any, number: int) -> None:
    """Queue again the configuration of trial `number`, stopped by a signal (Ctrl-C, or SIGTERM
    from Slurm's scancel or time limit) and failed by Optuna: the next worker that asks, or the
    campaign resumed, trains it first, as it would a dead worker's trial. Nothing if it was not
    failed, drew no configuration yet, or was queued again already (another worker judged its
    worker dead first)."""
    try:
        trials = study.get_trials(deepcopy=False)
        stopped = next((t for t in trials if t.number == number), None)
        if stopped is None or stopped.state != optuna_state("FAIL") or not stopped.params:
            return
        if not any(number in t.system_attrs.get("retry_history", ()) for t in trials):
            queue_again(study, stopped)
    except Exception as e:  # the stop goes on; the trial stays FAIL, and its configuration is lost
        print(f"could not queue trial {number} again: {type(e).__name__}: {e}", file=sys.stderr)


def fail_trial(study: Any, trial: Any) -> None:
    """Fail a RUNNING trial whose worker is gone and queue its configuration again."""
    study.tell(trial.number, state=optuna_state("FAIL"), skip_if_finished=True)
    fail_and_retry(study, trial)


def trial_counts(study: Any) -> tuple[int, list[int], list[int]]:
    """Finished (COMPLETE) trials, and the numbers of the RUNNING and WAITING (queued) ones."""
    states = optuna_state("COMPLETE"), optuna_state("RUNNING"), optuna_state("WAITING")
    trials = study.get_trials(deepcopy=False, states=states)
    complete = sum(t.state == states[0] for t in trials)
    running = [t.number for t in trials if t.state == states[1]]
    return complete, running, [t.number for t in trials if t.state == states[2]]


def trial_failed(study: Any, number: int) -> bool:
    """Whether trial `number` is FAIL: another worker judged its worker dead (missed heartbeats,
    e.g. a suspended process) and retried it; a result of its worker must then not count."""
    failed = study.get_trials(deepcopy=False, states=(optuna_state("FAIL"),))
    return any(t.number == number for t in failed)


def is_surplus(study: Any, number: int, target: int) -> bool:
    """Whether trial `number` would take the campaign past its target: the finished nets plus
    the running or queued trials numbered before it already make up the target (a race between
    workers that asked at the same moment, or a retry queued meanwhile; the lowest-numbered
    trials go on)."""
    complete, running, waiting = trial_counts(study)
    return complete + sum(n < number for n in running + waiting) >= target


def wait_for_work(study: Any, target: int, poll: float, heartbeats: bool = True) -> bool:
    """False once the campaign holds `target` finished nets; True when a net is to be trained.

    While the last nets are being trained elsewhere, wait: if one of those workers dies, its
    trial comes back (retried) and this worker takes it. Without heartbeats (the journal file),
    trials of this host's processes that are gone are failed and retried instead.
    """
    import optuna

    while True:
        interrupts.check()
        with warnings.catch_warnings():  # fail_stale_trials is marked experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        if not heartbeats:
            fail_orphaned_trials(study)
        complete, running, waiting = trial_counts(study)
        if complete >= target:
            return False
        if waiting or complete + len(running) < target:
            return True
        time.sleep(poll)


def nets_to_ask(settings: Any, study: Any, asked: int, poll: float, block: int = 1) -> int:
    """How many trials a worker asks for next, at most `block`; 0 once its work is done:
    `n_nets` asked in this call, or (with `target`) the campaign holding `target` finished nets."""
    interrupts.check()
    if settings.target:
        return block if wait_for_work(study, settings.target, poll, settings.heartbeat_enabled) else 0
    return max(0, min(block, settings.n_nets - asked))


def fail_orphaned_trials(study: Any, pids: list[int] | None = None) -> list[int]:
    """Fail and retry the RUNNING trials of processes of this host that no longer exist (or of
    the given pids): what heartbeats do on an RDB storage, for the journal file, which has none.
    A process interrupted between Optuna creating its trial and telling it leaves such a trial,
    and it would otherwise count as in progress for ever."""
    orphans = []
    for trial in study.get_trials(deepcopy=False, states=(optuna_state("RUNNING"),)):
        worker = trial.user_attrs.get("worker", "")
        orphaned = worker_of_this_host(worker, pids) if pids is not None else worker_state(worker) == GONE
        if orphaned:
            fail_trial(study, trial)
            orphans.append(trial.number)
    return orphans


def drop_taken_over(run_id: str, summary: Any) -> None:
    """A net whose trial another worker failed: its run must not count as finished (it may have
    ended FINISHED in the moment after the last check)."""
    fail_net_run(run_id, TAKEN_OVER)
    if run_id in summary.finished:
        summary.finished.remove(run_id)
    summary.failed.append(run_id)
    print(f"run {run_id} {TAKEN_OVER}", file=sys.stderr)
