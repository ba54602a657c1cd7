"""A campaign in this process: net after net, each an Optuna trial (ask/tell on the shared study)
and an MLflow run nested under the campaign's run, until this call's `n_nets` are trained or the
campaign holds exactly `target` finished nets.

The Optuna study is a second view of the campaign: each trial holds the net's MLflow run id and is
told the net's final test accuracy (or fails). A trial that another worker failed meanwhile (this
worker was judged dead) does not count: its net's run ends FAILED, and the campaign goes on.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from nws import interrupts, space
from nws.backend import environment_tags
from nws.campaign.net_job import NetJob
from nws.campaign.orphans import close_orphans
from nws.campaign.settings import CampaignSettings
from nws.campaign.storage import open_study
from nws.campaign.trials import (
    TAKEN_OVER,
    claim,
    drop_taken_over,
    end_interrupted,
    is_surplus,
    nets_to_ask,
    trial_failed,
)
from nws.processes import worker_name
from nws.tracking.experiments import existing_run, working_experiment
from nws.tracking.runs import check_tracking_server, parent_run
from nws.tracking.tags import campaign_tags


@dataclass
class CampaignSummary:
    campaign: str
    finished: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    campaign_run_id: str = ""

    def line(self) -> str:
        return (
            f"campaign {self.campaign}: {len(self.finished)} nets finished, "
            f"{len(self.failed)} failed (MLflow run {self.campaign_run_id})"
        )


def open_campaign(settings: CampaignSettings) -> Any:
    """Everything a campaign needs before its first net, checked within seconds (the tracking
    server answers, the datasets are there), then its study, created or continued. A campaign
    started again first closes what a killed process of this host left RUNNING (a worker of
    `--workers` leaves that to its parent)."""
    from nws.backend import named
    from nws.data import check_available

    check_tracking_server()
    named(settings.backend).environment(settings.deterministic, settings.threads)
    check_available(list(settings.datasets), settings.data_dir, settings.download)
    if settings.parent_run_id:
        existing_run("parent_run_id", settings.parent_run_id)
    study = open_study(settings)
    if not settings.parent_run_id:
        experiment_id = working_experiment(settings.experiment)
        for entry in close_orphans(study, settings.name, experiment_ids=[experiment_id]):
            if entry.closed:
                print(f"closed {entry.what}: its worker {entry.worker} is gone", file=sys.stderr)
    return study


def train_campaign(settings: CampaignSettings, study: Any, params: Mapping[str, Any]) -> CampaignSummary:
    """Train the campaign's nets in this process, in the campaign's run (`params`: what that run
    records, the command's parameters as given), or nested under `parent_run_id` (a worker of
    `--workers`, whose parent holds the campaign's run)."""
    import mlflow

    from nws.backend import configure

    configure(deterministic=settings.deterministic, threads=settings.threads)
    if settings.parent_run_id:
        summary = CampaignSummary(settings.name, campaign_run_id=settings.parent_run_id)
        train_nets(settings, study, summary)
        return summary
    with parent_run(
        campaign_tags(settings.subset, settings.name), params, experiment=settings.experiment
    ) as run:
        summary = CampaignSummary(settings.name, campaign_run_id=run.info.run_id)
        train_nets(settings, study, summary)
        mlflow.set_tags({"nws.finished_nets": str(len(summary.finished))})
    return summary


def train_nets(settings: CampaignSettings, study: Any, summary: CampaignSummary) -> None:
    """The per-net loop: one Optuna trial per net, its outcome added to `summary` (in blocks of
    `pack` trials with `--pack`: `nws.campaign.packed`)."""
    import optuna

    from nws.progress import Progress

    environment = environment_tags()
    if settings.pack > 1:
        from nws.campaign.packed import train_packed

        train_packed(settings, study, summary, environment)
        return
    total = settings.target or settings.n_nets
    progress = Progress(total)
    worker = worker_name()
    poll = min(5.0, settings.heartbeat / 2)
    index = 0
    current: dict[str, Any] = {}  # the trial being trained, and its MLflow run

    def objective(trial: Any) -> float:
        claim(trial, worker)
        if settings.target and is_surplus(study, trial.number, settings.target):
            raise optuna.TrialPruned("surplus: the campaign's target is already being trained")
        current["number"] = trial.number  # asked: queued again if a stop signal ends it
        config = space.suggest(trial, settings.subset, list(settings.datasets))
        net = NetJob(settings, trial.number, config, environment)
        progress.start_net(index, net.label, settings.train.max_epochs)
        trial.set_user_attr("seed", net.seed)

        def on_start(run_id: str) -> None:
            current["trial"], current["run_id"] = trial.number, run_id
            trial.set_user_attr("mlflow_run_id", run_id)

        outcome = net.run(observers=[progress.epoch, _stop_if_asked], on_start=on_start,
                          still_ours=lambda: not trial_failed(study, trial.number))  # fmt: skip
        progress.end_net(outcome.line(index, total))
        if outcome.failure == TAKEN_OVER or (outcome.finished and trial_failed(study, trial.number)):
            # The trial is FAIL already, so Optuna cannot tell it: the loop below drops the net.
            raise optuna.TrialPruned(TAKEN_OVER)
        if not outcome.finished:
            trial.set_user_attr("failure", outcome.failure)
            summary.failed.append(outcome.run_id)
            return float("nan")  # Optuna fails the trial
        summary.finished.append(outcome.run_id)
        return outcome.test_accuracy

    try:
        while nets_to_ask(settings, study, index, poll):
            if settings.replay is not None:
                study.enqueue_trial(settings.replay.as_dict())
            index += 1
            current.clear()
            try:
                # One trial per call: Optuna runs the heartbeat thread and fails stale trials first.
                study.optimize(objective, n_trials=1, gc_after_trial=False)
            except (ValueError, AssertionError):
                # What Optuna's optimize raises when it cannot tell a trial that another worker
                # failed meanwhile: seen by the objective, or in the moment after it checked.
                if "trial" not in current or not trial_failed(study, current["trial"]):
                    raise
                drop_taken_over(current["run_id"], summary)
            except KeyboardInterrupt:  # its net may have ended FINISHED, its trial not COMPLETE
                end_interrupted(study, current)
                raise
    finally:
        progress.close()


def _stop_if_asked(_model: Any, _epoch: int, _metrics: Any) -> None:
    """After each evaluation: stop the net if a stop signal's KeyboardInterrupt was lost."""
    interrupts.check()
