"""`sample --workers N`: N worker processes on one campaign, on this machine.

The parent holds the campaign's MLflow run and starts each worker as `nws sample` with the same
parameters, one worker each, the CPU threads split between them (on a GPU they share the device,
memory growth on). The workers coordinate only through the campaign's Optuna storage. The parent
supervises them: on a storage without heartbeats (a journal file) it fails and retries the trials
of a worker that died itself; in target mode it starts a replacement worker.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from typing import Any

from nws import interrupts
from nws.sampling import CampaignSummary, SampleOptions, fail_orphaned_trials, optuna_state

POLL_SECONDS = 1.0


def worker_command(options: SampleOptions, **changes: Any) -> list[str]:
    """`python -m nws.cli sample ...` with these options."""
    worker = dataclasses.replace(options, **changes)
    args = [sys.executable, "-m", "nws.cli", "sample"]
    for f in dataclasses.fields(worker):
        value = getattr(worker, f.name)
        args += [
            f"--{f.name.replace('_', '-')}",
            ("true" if value else "false") if isinstance(value, bool) else str(value),
        ]
    return args


def _quotas(options: SampleOptions) -> list[int]:
    """n_nets per worker when there is no target (the target itself is shared)."""
    if options.target:
        return [options.n_nets] * options.workers
    base, extra = divmod(options.n_nets, options.workers)
    return [base + (i < extra) for i in range(options.workers)]


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


def run_workers(options: SampleOptions, study: Any) -> CampaignSummary:
    import mlflow

    from nws import tracking
    from nws.sampling import _campaign_tags, trial_counts

    threads = options.threads or max(1, (os.cpu_count() or 1) // options.workers)
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri()}

    workers: dict[subprocess.Popen, int] = {}  # each worker started, and its n_nets

    def start(quota: int) -> None:
        command = worker_command(options, workers=1, n_nets=max(1, quota), threads=threads,
                                 parent_run_id=run.info.run_id)  # fmt: skip
        # A stop while Popen runs is held until the worker is in `workers`, where `_stop` finds
        # it: the worker has its own session (a terminal's Ctrl-C reaches the parent only, which
        # passes it on once), so one left out would run on alone.
        with interrupts.deferred():
            workers[subprocess.Popen(command, env=env, start_new_session=True)] = quota

    restarts = options.workers
    failed = False
    with tracking.parent_run(_campaign_tags(options), dataclasses.asdict(options)) as run:
        try:
            before, _, _ = trial_counts(study)
            for quota in _quotas(options):
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
                    if not options.heartbeat_enabled:  # on an RDB storage the heartbeat does it
                        fail_orphaned_trials(study, [process.pid])
                    complete, _, _ = trial_counts(study)
                    if options.target and complete < options.target and restarts > 0:
                        restarts -= 1
                        start(quota)
                    else:
                        failed = True
        except BaseException:
            _stop(list(workers))
            if not options.heartbeat_enabled:  # trials an interrupted worker could not tell
                fail_orphaned_trials(study, [p.pid for p in workers])
            raise
        complete, _, _ = trial_counts(study)
        finished = [t.user_attrs.get("mlflow_run_id", "") for t in study.get_trials(deepcopy=False)
                    if t.state == optuna_state("COMPLETE")][before:]  # fmt: skip
        mlflow.set_tags({"nws.finished_nets": str(complete), "nws.workers": str(options.workers)})
        if failed and not (options.target and complete >= options.target):
            from nws.errors import NWSError

            raise NWSError(f"campaign {options.campaign}: a worker failed ({complete} nets finished in all)")
    return CampaignSummary(options.campaign, finished=finished, campaign_run_id=run.info.run_id)
