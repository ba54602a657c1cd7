"""`sample --workers N`: N worker processes on one campaign, on this machine.

The parent holds the campaign's MLflow run and starts each worker as `nws sample` with the same
parameters, one worker each, the CPU threads split between them (on a GPU they share the device,
memory growth on). The workers coordinate only through the campaign's Optuna storage. The parent
supervises them: on a storage without heartbeats (a journal file) it fails and retries the trials
of a worker that died itself; in target mode it starts a replacement worker. A worker does not
outlive its parent: on Linux it gets SIGTERM when the parent dies, even by SIGKILL (`_end_with_parent`),
and stops as on any stop (its net's run KILLED, its trial retried by the next resume).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from typing import Any

from nws import interrupts
from nws.campaign.loop import CampaignSummary
from nws.campaign.settings import CampaignSettings
from nws.campaign.trials import fail_orphaned_trials, optuna_state, trial_counts
from nws.errors import NWSError
from nws.tracking.runs import parent_run
from nws.tracking.tags import campaign_tags

POLL_SECONDS = 1.0
PR_SET_PDEATHSIG = 1  # Linux prctl(2)


def _end_with_parent() -> Any:
    """A function for `Popen(preexec_fn=...)` that makes the child get SIGTERM when this process
    dies (Linux; None elsewhere, where workers of a killed parent run on until their quota and
    `nws cleanup` or the resume closes what they leave)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getpid()

    def end_with_parent() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before the request: do not start
            os._exit(128 + signal.SIGTERM)

    return end_with_parent


def worker_command(params: Mapping[str, Any], **changes: Any) -> list[str]:
    """`python -m nws.cli sample ...` with these parameter values."""
    args = [sys.executable, "-m", "nws.cli", "sample"]
    for name, value in {**params, **changes}.items():
        args += [
            f"--{name.replace('_', '-')}",
            ("true" if value else "false") if isinstance(value, bool) else str(value),
        ]
    return args


def _quotas(settings: CampaignSettings, workers: int) -> list[int]:
    """n_nets per worker when there is no target (the target itself is shared)."""
    if settings.target:
        return [settings.n_nets] * workers
    base, extra = divmod(settings.n_nets, workers)
    return [base + (i < extra) for i in range(workers)]


def _stop(workers: list[subprocess.Popen]) -> None:
    """Stop the workers as Ctrl-C would stop one (SIGTERM: a SIGINT that a process was started
    ignoring stays ignored), and wait for them to end their nets' runs. Asked again meanwhile
    (a second Ctrl-C), kill them instead of leaving them running in their own sessions."""
    for process in workers:
        process.send_signal(signal.SIGTERM)
    try:
        for process in workers:
            process.wait()
    except KeyboardInterrupt:
        print("stopping the workers now (killed)", file=sys.stderr)
        for process in workers:
            process.kill()
        for process in workers:
            process.wait()


def run_workers(
    settings: CampaignSettings, params: Mapping[str, Any], n_workers: int, study: Any
) -> CampaignSummary:
    """Hold the campaign's run (which records `params`, the `sample` parameters as given), start
    `n_workers` workers under it, each `nws sample` with the same parameters, and supervise them
    until they end."""
    import mlflow

    threads = settings.threads or max(1, (os.cpu_count() or 1) // n_workers)
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri()}

    workers: dict[subprocess.Popen, int] = {}  # each worker started, and its n_nets

    def start(quota: int) -> None:
        command = worker_command(params, workers=1, n_nets=max(1, quota), threads=threads,
                                 parent_run_id=run.info.run_id)  # fmt: skip
        # A stop while Popen runs is held until the worker is in `workers`, where `_stop` finds
        # it: the worker has its own session (a terminal's Ctrl-C reaches the parent only, which
        # passes it on once), so one left out would run on alone.
        with interrupts.deferred():
            worker = subprocess.Popen(command, env=env, start_new_session=True, preexec_fn=_end_with_parent())
            workers[worker] = quota

    restarts = n_workers
    failed = False
    with parent_run(
        campaign_tags(settings.subset, settings.name), params, experiment=settings.experiment
    ) as run:
        try:
            before, _, _ = trial_counts(study)
            for quota in _quotas(settings, n_workers):
                if quota > 0:
                    start(quota)
            while workers:
                time.sleep(POLL_SECONDS)
                interrupts.check()
                for process in [p for p in workers if p.poll() is not None]:
                    quota = workers.pop(process)
                    if process.returncode == 0:
                        continue
                    print(f"worker {process.pid} ended with code {process.returncode}", file=sys.stderr)
                    if not settings.heartbeat_enabled:  # on an RDB storage the heartbeat does it
                        fail_orphaned_trials(study, [process.pid])
                    complete, _, _ = trial_counts(study)
                    if settings.target and complete < settings.target and restarts > 0:
                        restarts -= 1
                        start(quota)
                    else:
                        failed = True
        except BaseException:
            _stop(list(workers))
            if not settings.heartbeat_enabled:  # trials an interrupted worker could not tell
                fail_orphaned_trials(study, [p.pid for p in workers])
            raise
        complete, _, _ = trial_counts(study)
        finished = [t.user_attrs.get("mlflow_run_id", "") for t in study.get_trials(deepcopy=False)
                    if t.state == optuna_state("COMPLETE")][before:]  # fmt: skip
        mlflow.set_tags({"nws.finished_nets": str(complete), "nws.workers": str(n_workers)})
        if failed and not (settings.target and complete >= settings.target):
            raise NWSError(f"campaign {settings.name}: a worker failed ({complete} nets finished in all)")
    return CampaignSummary(settings.name, finished=finished, campaign_run_id=run.info.run_id)
