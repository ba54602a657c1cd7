"""A campaign's nets trained in packs (`sample --pack P`, JAX backend): the worker asks Optuna
for a block of P trials, groups their nets by `nws.net.pack.pack_key` and trains each group in one
compiled step (`nws.net.pack.PackTrainer`).

Each net stays its own Optuna trial and MLflow run, exactly as when trained alone: every trial
runs in its own thread through `study.optimize(n_trials=1)` (so Optuna keeps its heartbeat and
fails stale trials first), draws its configuration, starts its run, then waits while this
thread trains the block; the trial's thread then stores its artifacts and ends its run (FINISHED
only once they are stored, FAILED for a NaN loss, KILLED on a stop signal), and tells Optuna.
Signals reach this thread only: a stop ends every net of the block that is not yet finished.
"""

from __future__ import annotations

import sys
import threading
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Any

from nws import interrupts, space
from nws.campaign.net_job import NetJob, NetOutcome
from nws.campaign.settings import CampaignSettings
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
from nws.tracking import runs

WAIT_SECONDS = 0.5


@dataclass
class _Ticket:
    """One net of a block, handed from its trial's thread to the trainer and back."""

    job: NetJob
    data: Any
    run_id: str
    recorder: Any
    done: threading.Event = field(default_factory=threading.Event)
    outcome: Any = None  # TrainResult, TrainingDiverged, or the error that ends the block


class _Block:
    """The trials of one block: their threads, the nets they hand over, how they ended."""

    def __init__(
        self, settings: CampaignSettings, study: Any, summary: Any, progress: Any, size: int
    ) -> None:
        self.settings, self.study, self.summary, self.progress, self.size = (
            settings,
            study,
            summary,
            progress,
            size,
        )
        self.environment: dict[str, str] = {}
        self.lock = threading.Condition()
        self.tickets: list[_Ticket] = []
        self.without_net = 0  # threads that ended without handing over a net (surplus, errors)
        self.errors: list[BaseException] = []
        self.closing: BaseException | None = None  # set: nets handed over later end with it
        self.worker = worker_name()

    def objective(self, trial: Any, current: dict[str, Any]) -> float:
        import optuna

        from nws.net.snapshots import SnapshotRecorder
        from nws.net.training import TrainingDiverged

        s, study = self.settings, self.study
        claim(trial, self.worker)
        if s.target and is_surplus(study, trial.number, s.target):
            raise optuna.TrialPruned("surplus: the campaign's target is already being trained")
        current["number"] = trial.number  # asked: queued again if a stop signal ends it
        config = space.suggest(trial, s.subset, list(s.datasets))
        job = NetJob(s, trial.number, config, self.environment)
        trial.set_user_attr("seed", job.seed)
        data, layout, run_id = job.start()
        try:
            current["trial"], current["run_id"] = trial.number, run_id
            trial.set_user_attr("mlflow_run_id", run_id)
            with SnapshotRecorder(layout) as recorder:
                ticket = _Ticket(job, data, run_id, recorder)
                with self.lock:
                    self.tickets.append(ticket)
                    if self.closing is not None:
                        ticket.outcome = self.closing
                        ticket.done.set()
                    self.lock.notify_all()
                ticket.done.wait()
                if isinstance(ticket.outcome, KeyboardInterrupt):
                    raise KeyboardInterrupt(str(ticket.outcome))
                if isinstance(ticket.outcome, BaseException):
                    raise RuntimeError(f"its pack failed: {runs.error_text(ticket.outcome)}")
                if isinstance(ticket.outcome, TrainingDiverged):
                    outcome = job.diverged(run_id, ticket.outcome)
                else:
                    still_ours = lambda: not trial_failed(study, trial.number)  # noqa: E731
                    outcome = job.finish(run_id, layout, recorder, ticket.outcome, still_ours)
        except BaseException as error:
            runs.abort_run(run_id, error)
            raise
        return self._told(trial, outcome)

    def _told(self, trial: Any, outcome: NetOutcome) -> float:
        """What the trial reports: as `nws.campaign.loop` does for a net trained alone."""
        import optuna

        with self.lock:
            self.progress.end_net(
                outcome.line(trial.number + 1, self.settings.target or self.settings.n_nets)
            )
        if outcome.failure == TAKEN_OVER or (outcome.finished and trial_failed(self.study, trial.number)):
            raise optuna.TrialPruned(TAKEN_OVER)
        if not outcome.finished:
            trial.set_user_attr("failure", outcome.failure)
            self.summary.failed.append(outcome.run_id)
            return float("nan")  # Optuna fails the trial
        self.summary.finished.append(outcome.run_id)
        return outcome.test_accuracy

    def thread(self) -> None:
        current: dict[str, Any] = {}
        try:
            self.study.optimize(lambda t: self.objective(t, current), n_trials=1, gc_after_trial=False)
        except (ValueError, AssertionError) as error:
            if "trial" in current and trial_failed(self.study, current["trial"]):
                drop_taken_over(current["run_id"], self.summary)
            else:
                self.errors.append(error)
        except BaseException as error:  # KeyboardInterrupt included: the main thread re-raises it
            if isinstance(error, KeyboardInterrupt):
                end_interrupted(self.study, current)
            self.errors.append(error)
        finally:
            with self.lock:
                if "run_id" not in current:
                    self.without_net += 1
                self.lock.notify_all()

    def run(self) -> None:
        threads = [threading.Thread(target=self.thread, daemon=True) for _ in range(self.size)]
        for thread in threads:
            thread.start()
        try:
            with self.lock:
                while len(self.tickets) + self.without_net < self.size:
                    self.lock.wait(WAIT_SECONDS)
                    interrupts.check()
                tickets = list(self.tickets)
            self._train(tickets)
        except BaseException as error:
            with self.lock:
                self.closing = error
                for ticket in self.tickets:
                    if not ticket.done.is_set():
                        ticket.outcome = error
                        ticket.done.set()
            for thread in threads:
                thread.join()
            raise
        for thread in threads:
            thread.join()
        for error in self.errors:
            raise error

    def _train(self, tickets: list[_Ticket]) -> None:
        """Group the block's nets by pack key and train each group; hand every net its outcome."""
        from nws.net.pack import PackTrainer, pack_key

        groups: dict[Any, list[_Ticket]] = defaultdict(list)
        for ticket in tickets:
            groups[pack_key(ticket.job.config, ticket.data)].append(ticket)
        for group in groups.values():

            def capture(ticket: _Ticket) -> Any:
                def observe(model: Any, epoch: int, metrics: dict[str, float]) -> None:
                    ticket.recorder.record(model, epoch, metrics)
                    runs.log_epoch(epoch, metrics, run_id=ticket.run_id)

                return observe

            trainer = PackTrainer(
                [t.job.config for t in group], [t.data for t in group], [t.job.seed for t in group],
                self.settings.train,
            )  # fmt: skip
            outcomes = trainer.train([[capture(t), _stop_if_asked] for t in group])
            for ticket, outcome in zip(group, outcomes, strict=True):
                ticket.outcome = outcome
                ticket.done.set()


def _stop_if_asked(_model: Any, _epoch: int, _metrics: Any) -> None:
    """After each evaluation: stop if a stop signal's KeyboardInterrupt was lost."""
    interrupts.check()


def train_packed(settings: CampaignSettings, study: Any, summary: Any, environment: dict[str, str]) -> None:
    """The campaign loop of `nws.campaign.loop.train_nets`, a block of `settings.pack` trials at
    a time: `n_nets` nets in this call, or until the campaign holds `target` finished nets."""
    from nws.progress import Progress

    total = settings.target or settings.n_nets
    progress = Progress(total)
    poll = min(5.0, settings.heartbeat / 2)
    # The nets' runs start in the trials' threads, where the campaign's run is not active.
    settings = replace(settings, parent_run_id=settings.parent_run_id or summary.campaign_run_id)
    asked = 0
    try:
        while size := nets_to_ask(settings, study, asked, poll, settings.pack):
            if settings.replay is not None:
                for _ in range(size):
                    study.enqueue_trial(settings.replay.as_dict())
            block = _Block(settings, study, summary, progress, size)
            block.environment = environment
            block.run()
            asked += size
    finally:
        progress.close()
        sys.stdout.flush()
