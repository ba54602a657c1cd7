"""A sampling campaign: Optuna hands out configurations (ask/tell on a shared study), each net is
trained with snapshot capture and becomes one MLflow run nested under the campaign's run.

The Optuna study is a second view of the campaign: each trial holds the net's MLflow run id and is
told the net's final test accuracy (or fails). Many workers (processes, machines) share one
campaign through the study's storage. With a `target`, they train until the campaign holds
exactly that many finished nets. On an RDB storage each running trial sends Optuna heartbeats,
and the trial of a worker that died is failed (its MLflow run marked FAILED) and retried by
Optuna's RetryFailedTrialCallback.
"""

from __future__ import annotations

import os
import platform
import socket
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nws import __version__, interrupts, space
from nws.errors import ParameterError
from nws.fidelity import DEFAULT_FIDELITY, check_fidelity
from nws.params import at_least, param, writable_directory
from nws.space import NetConfig
from nws.tracking import worker_name

DEFAULT_STORAGE = "optuna-journal.log"
STUDY_ATTRS = ("subset", "datasets", "fidelity")
"""Study user attributes that fix a campaign's space; a continuation must match them."""


@dataclass(frozen=True)
class SampleOptions:
    """The parameters of the `sample` entry point."""

    n_nets: int = param(1, "nets to train in this call")
    subset: str = param("main", "fixed (architecture pinned) or main (architecture drawn too)")
    datasets: str = param("offline", "comma list of datasets to draw from; 'offline' or 'paper' name groups")
    prints: int = param(20, "snapshots kept per net (>= 2)")
    max_epochs: int = param(1000, "most epochs per net")
    min_epochs: int = param(20, "epochs before early stopping may stop a net")
    seed: int = param(0, "campaign seed: hyper-parameters and net seeds derive from it")
    campaign: str = param("default", "campaign name: the Optuna study and the nws.campaign tag")
    storage: str = param(
        "", f"Optuna storage: an RDB URL or a journal file path (default ./{DEFAULT_STORAGE})"
    )
    data_dir: str = param("", "root of the datasets' official files (default $NWS_DATA_DIR)")
    download: bool = param(True, "download missing paper datasets")
    max_train_images: int = param(0, "cap on training images per net (0 = all)")
    max_eval_images: int = param(0, "cap on validation and test images per net (0 = all)")
    config: str = param(
        "", "replay one configuration: name=value,... (all 13) or 13 values in NWS column order"
    )
    lr_decay: float = param(1.0, "per-epoch learning-rate factor (1.0 = constant, as published)")
    mixed_precision: bool = param(False, "train in mixed float16 (GPU)")
    fidelity: str = param(
        DEFAULT_FIDELITY, "paper (train as the released code did) or clean (Keras defaults, clean evaluation)"
    )
    deterministic: bool = param(True, "TensorFlow op determinism (bit-identical on CPU)")
    target: int = param(0, "finished nets the campaign should hold; workers train until then (0: n_nets)")
    workers: int = param(1, "worker processes on this machine, all on the same campaign")
    threads: int = param(0, "TensorFlow CPU threads per worker (0: the cores split between workers)")
    heartbeat: int = param(
        30, "seconds between heartbeats on an RDB storage; a trial silent for 2x this is retried"
    )
    parent_run_id: str = param("", "MLflow run to nest the nets under (set for the workers of --workers)")

    @property
    def heartbeat_enabled(self) -> bool:
        """Heartbeats need an RDB storage (Optuna's journal storage has none)."""
        return "://" in (self.storage.strip() or DEFAULT_STORAGE)

    def validate(self) -> tuple[list[str], NetConfig | None]:
        """Check every parameter; return the resolved datasets and the replay config."""
        from nws.data import resolve_datasets

        at_least("n_nets", self.n_nets, 1)
        space.check_subset(self.subset)
        at_least("prints", self.prints, 2)
        at_least("max_epochs", self.max_epochs, 0)
        at_least("min_epochs", self.min_epochs, 0)
        if self.min_epochs > self.max_epochs:
            raise ParameterError(
                "min_epochs", f"{self.min_epochs} is larger than max_epochs ({self.max_epochs})"
            )
        at_least("seed", self.seed, 0)
        at_least("max_train_images", self.max_train_images, 0)
        at_least("max_eval_images", self.max_eval_images, 0)
        if not 0.0 < self.lr_decay <= 1.0:
            raise ParameterError("lr_decay", f"{self.lr_decay} is not in (0, 1]")
        check_fidelity(self.fidelity)
        if not self.campaign.strip():
            raise ParameterError("campaign", "must not be empty")
        at_least("target", self.target, 0)
        at_least("workers", self.workers, 1)
        at_least("threads", self.threads, 0)
        at_least("heartbeat", self.heartbeat, 1)
        check_storage(self.storage)
        datasets = resolve_datasets(self.datasets)
        replay = None
        if self.config.strip():
            replay = NetConfig.parse(self.config)
            if replay.dataset not in datasets:
                datasets = resolve_datasets(replay.dataset)
            replay.check(self.subset, datasets)
        return datasets, replay


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


def open_storage(url: str, heartbeat: int | None = None) -> Any:
    """An Optuna storage from a URL: RDB URLs (sqlite:///, postgresql://, ...) as RDBStorage,
    `journal:<path>` or a path as a JournalStorage file (several processes on one machine).

    With `heartbeat`, an RDB storage records a heartbeat per running trial; a trial silent for
    twice that long is failed, its MLflow run marked FAILED, and Optuna retries its configuration.
    """
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    url = check_storage(url)
    if "://" in url:
        connect = {"connect_timeout": 5} if url.startswith("postgresql") else {}
        try:
            with warnings.catch_warnings():  # heartbeats are marked experimental in Optuna
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url,
                    engine_kwargs={"connect_args": connect, "pool_pre_ping": True},
                    heartbeat_interval=heartbeat,
                    grace_period=2 * heartbeat if heartbeat else None,
                    heartbeat_stale_trial_callback=fail_and_retry if heartbeat else None,
                )
        except Exception as e:  # SQLAlchemy raises many types for bad URLs or servers
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ParameterError("storage", f"cannot open {url}: {reason}") from None
    return JournalStorage(JournalFileBackend(str(_journal_path(url))))


SERVER_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433, "oracle": 1521}
"""Default ports, so that a URL with the port and one without name the same server."""


def check_storage(url: str) -> str:
    """The storage URL (the default if empty), refused with one line when Optuna could not or
    must not write there: MLflow's own tracking database, however it is spelled (relative, with
    `..`, through a link, MLflow's default `mlflow.db`; both keep an `alembic_version` table, so
    Optuna would write its tables into MLflow's), or a journal file that cannot be written."""
    import mlflow

    url = url.strip() or DEFAULT_STORAGE
    tracking = mlflow.get_tracking_uri()
    if "://" in url:
        same = _same_database(url, tracking)
    else:
        mlflow_file = _sqlite_file(tracking)
        same = mlflow_file is not None and _same_file(_journal_path(url), mlflow_file)
    if same:
        raise ParameterError(
            "storage",
            f"{url} is MLflow's tracking database ({tracking}); give Optuna a storage of its own "
            "(both keep an alembic_version table)",
        )
    return url


def _journal_path(url: str) -> Path:
    """A journal file's path, checked: its directory exists and can be written, and it is a
    file that can be written if it exists."""
    path = Path(url.removeprefix("journal:")).expanduser()
    if path.is_dir():
        raise ParameterError("storage", f"{path} is a directory, not a journal file")
    if not os.path.lexists(path.parent):
        raise ParameterError("storage", f"directory {path.parent} does not exist")
    writable_directory("storage", path.parent)
    if path.exists() and not os.access(path, os.W_OK):
        raise ParameterError("storage", f"{path} is not writable")
    return path


def _sqlite_file(url: str) -> Path | None:
    """The database file of a SQLite URL; None for anything else (a server, memory, a file store)."""
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:  # not a SQLAlchemy URL: an http(s) tracking server, a file store, ...
        return None
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database.removeprefix("file:")).expanduser()


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file: the same inode when both exist (links, hard links),
    else the same path once links and `..` are resolved."""
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return os.path.realpath(a) == os.path.realpath(b)


def _same_database(url: str, other: str) -> bool:
    """Whether two SQLAlchemy URLs name one database: one SQLite file, or one database of one
    server (user, password, driver and options aside)."""
    from sqlalchemy.engine import make_url

    files = _sqlite_file(url), _sqlite_file(other)
    if files[0] is not None and files[1] is not None:
        return _same_file(*files)
    try:
        a, b = make_url(url), make_url(other)
    except Exception:
        return False
    backend = a.get_backend_name()
    if backend == "sqlite" or backend != b.get_backend_name():
        return False
    return ((a.host or "").lower(), a.port or SERVER_PORTS.get(backend), a.database) == (
        (b.host or "").lower(),
        b.port or SERVER_PORTS.get(backend),
        b.database,
    )


MAX_RETRIES = 2


def fail_and_retry(study: Any, trial: Any) -> None:
    """A trial whose worker died: mark its MLflow run FAILED, then let Optuna's
    RetryFailedTrialCallback enqueue its configuration again."""
    import optuna

    run_id = trial.user_attrs.get("mlflow_run_id")
    try:
        if run_id:
            fail_net_run(run_id, f"worker {trial.user_attrs.get('worker')} died")
    except Exception as e:  # the retry matters more; the run stays not FINISHED either way
        print(f"could not mark MLflow run {run_id} FAILED: {type(e).__name__}: {e}", file=sys.stderr)
    finally:
        optuna.storages.RetryFailedTrialCallback(max_retry=MAX_RETRIES)(study, trial)


def fail_net_run(run_id: str, reason: str) -> bool:
    """Mark a net's run FAILED with the reason, unless it already ended FAILED or KILLED.

    For a net whose trial did not complete: a RUNNING run of a dead worker, or a FINISHED one
    whose worker stopped (or was taken over) before its trial was told. Its configuration is
    trained again, so the run must not count as finished.
    """
    from mlflow import MlflowClient

    from nws import tracking

    client = MlflowClient()
    if client.get_run(run_id).info.status not in ("RUNNING", "FINISHED"):
        return False
    tracking.end_failed_run(client, run_id, "FAILED", reason)
    return True


def open_study(options: SampleOptions, datasets: list[str]) -> Any:
    """Create or continue the campaign's study; refuse a continuation with another space."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(options.storage, options.heartbeat)
    study = optuna.create_study(
        study_name=options.campaign,
        storage=storage,
        direction="maximize",
        sampler=space.TrialSeededSampler(options.seed),
        load_if_exists=True,
    )
    wanted = {"subset": options.subset, "datasets": ",".join(datasets), "seed": options.seed,
              "fidelity": options.fidelity}  # fmt: skip
    existing = study.user_attrs
    if "fidelity" not in existing and study.get_trials(deepcopy=False):
        existing = {**existing, "fidelity": "clean"}  # begun before the option: its nets trained clean
    for key, value in wanted.items():
        # Key by key: workers starting together may see the study before its creator has set
        # every attribute; the first to find one missing sets it.
        if key not in existing:
            study.set_user_attr(key, value)
        elif key in STUDY_ATTRS and existing[key] != value:
            raise ParameterError(
                key,
                f"campaign {options.campaign!r} was started with {key}={existing[key]}; "
                f"got {value} (use another campaign name)",
            )
    return study


def _campaign_tags(options: SampleOptions) -> dict[str, str]:
    from nws import tracking

    return {
        tracking.TAG_ROLE: "campaign",
        tracking.TAG_CAMPAIGN: options.campaign,
        tracking.TAG_SUBSET: options.subset,
        tracking.TAG_STUDY: options.campaign,
    }


def _environment_tags() -> dict[str, str]:
    import keras
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    return {
        "nws.version": __version__,
        "nws.tensorflow": tf.__version__,
        "nws.keras": keras.__version__,
        "nws.python": platform.python_version(),
        "nws.device": f"GPU x{len(gpus)}" if gpus else "CPU",
    }


def run_campaign(options: SampleOptions) -> CampaignSummary:
    """Train a campaign's nets: `n_nets` in this call, or until the campaign holds `target`
    finished nets; with `workers` > 1, in that many processes. Every net is an MLflow run and an
    Optuna trial."""
    datasets, replay = options.validate()
    from nws.data import check_available
    from nws.tracking import check_tracking_server
    from nws.training import configure_tensorflow, tensorflow_environment

    check_tracking_server()
    tensorflow_environment(options.threads)  # before loading images starts TensorFlow
    check_available(datasets, options.data_dir or None, options.download)
    study = open_study(options, datasets)
    if not options.parent_run_id:  # a worker of `--workers`: its parent did this
        from nws.orphans import close_orphans

        for entry in close_orphans(study, options.campaign):
            if entry.closed:
                print(f"closed {entry.what}: its worker {entry.worker} is gone", file=sys.stderr)
    if options.workers > 1:
        from nws.workers import run_workers

        return run_workers(options, study)

    import mlflow

    from nws import tracking
    from nws.training import TrainSettings

    configure_tensorflow(deterministic=options.deterministic, threads=options.threads)
    settings = TrainSettings(
        max_epochs=options.max_epochs,
        min_epochs=options.min_epochs,
        lr_decay=options.lr_decay,
        mixed_precision=options.mixed_precision,
        fidelity=options.fidelity,
    )
    if options.parent_run_id:  # a worker of `--workers`: the parent holds the campaign run
        summary = CampaignSummary(options.campaign, campaign_run_id=options.parent_run_id)
        _train_nets(options, settings, study, datasets, replay, summary)
        return summary
    with tracking.parent_run(_campaign_tags(options), asdict(options)) as run:
        summary = CampaignSummary(options.campaign, campaign_run_id=run.info.run_id)
        _train_nets(options, settings, study, datasets, replay, summary)
        mlflow.set_tags({"nws.finished_nets": str(len(summary.finished))})
    return summary


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


def drop_taken_over(run_id: str, summary: CampaignSummary) -> None:
    """A net whose trial another worker failed: its run must not count as finished (it may have
    ended FINISHED in the moment after the last check)."""
    fail_net_run(run_id, TAKEN_OVER)
    if run_id in summary.finished:
        summary.finished.remove(run_id)
    summary.failed.append(run_id)
    print(f"run {run_id} {TAKEN_OVER}", file=sys.stderr)


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


def fail_orphaned_trials(study: Any, pids: list[int] | None = None) -> list[int]:
    """Fail and retry the RUNNING trials of processes of this host that no longer exist (or of
    the given pids): what heartbeats do on an RDB storage, for the journal file, which has none.
    A process interrupted between Optuna creating its trial and telling it leaves such a trial,
    and it would otherwise count as in progress for ever."""
    from nws.orphans import GONE, worker_state

    host = socket.gethostname()
    orphans = []
    for trial in study.get_trials(deepcopy=False, states=(optuna_state("RUNNING"),)):
        worker = trial.user_attrs.get("worker", "")
        worker_host, _, pid = worker.rpartition(":")
        if pids is not None:
            orphaned = worker_host == host and pid.isdigit() and int(pid) in pids
        else:
            orphaned = worker_state(worker) == GONE
        if orphaned:
            fail_trial(study, trial)
            orphans.append(trial.number)
    return orphans


def fail_trial(study: Any, trial: Any) -> None:
    """Fail a RUNNING trial whose worker is gone and queue its configuration again."""
    study.tell(trial.number, state=optuna_state("FAIL"), skip_if_finished=True)
    fail_and_retry(study, trial)


def is_surplus(study: Any, number: int, target: int) -> bool:
    """Whether trial `number` would take the campaign past its target: the finished nets plus
    the running or queued trials numbered before it already make up the target (a race between
    workers that asked at the same moment, or a retry queued meanwhile; the lowest-numbered
    trials go on)."""
    complete, running, waiting = trial_counts(study)
    return complete + sum(n < number for n in running + waiting) >= target


def _train_nets(
    options: SampleOptions,
    settings: Any,
    study: Any,
    datasets: list[str],
    replay: NetConfig | None,
    summary: CampaignSummary,
) -> None:
    import optuna

    from nws.progress import Progress

    environment = _environment_tags()
    total = options.target or options.n_nets
    progress = Progress(total)
    worker = worker_name()
    poll = min(5.0, options.heartbeat / 2)
    index = 0
    current: dict[str, Any] = {}  # the trial being trained, and its MLflow run

    def objective(trial: Any) -> float:
        trial.set_user_attr("worker", worker)  # first: a retry inherits the dead worker's name
        if options.target and is_surplus(study, trial.number, options.target):
            raise optuna.TrialPruned("surplus: the campaign's target is already being trained")
        config = space.suggest(trial, options.subset, datasets)
        net = NetJob(options, settings, trial.number, config, datasets, environment)
        progress.start_net(index, net.label, settings.max_epochs)
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
        while True:
            interrupts.check()
            if options.target:
                if not wait_for_work(study, options.target, poll, options.heartbeat_enabled):
                    break
            elif index >= options.n_nets:
                break
            if replay is not None:
                study.enqueue_trial(replay.as_dict())
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
                if "trial" in current and trial_failed(study, current["trial"]):
                    fail_net_run(current["run_id"], "interrupted before its trial was told")
                raise
    finally:
        progress.close()


def _stop_if_asked(_model: Any, _epoch: int, _metrics: Any) -> None:
    """After each evaluation: stop the net if a stop signal's KeyboardInterrupt was lost."""
    interrupts.check()


def optuna_state(name: str) -> Any:
    import optuna

    return getattr(optuna.trial.TrialState, name)


TAKEN_OVER = "taken over: judged dead (missed heartbeats), its trial was retried elsewhere"


@dataclass
class NetOutcome:
    run_id: str
    finished: bool
    test_accuracy: float = float("nan")
    epochs: int = 0
    failure: str = ""

    def line(self, index: int, total: int) -> str:
        if self.finished:
            return (
                f"net {index}/{total} finished: test accuracy {self.test_accuracy:.4f} after "
                f"{self.epochs} epochs (run {self.run_id})"
            )
        return f"net {index}/{total} failed: {self.failure} (run {self.run_id})"


@dataclass
class NetJob:
    """One net of a campaign: data, training, snapshot capture and its MLflow run."""

    options: SampleOptions
    settings: Any
    trial_number: int
    config: NetConfig
    datasets: list[str]
    environment: dict[str, str]

    @property
    def seed(self) -> int:
        return space.trial_seed(self.options.seed, self.trial_number)

    @property
    def label(self) -> str:
        c = self.config
        return f"trial {self.trial_number} {c.dataset} {c.optimizer} {c.activation}"

    def tags(self) -> dict[str, str]:
        from nws import tracking

        return {
            tracking.TAG_ROLE: "net",
            tracking.TAG_SUBSET: self.options.subset,
            tracking.TAG_CAMPAIGN: self.options.campaign,
            tracking.TAG_STUDY: self.options.campaign,
            tracking.TAG_TRIAL: str(self.trial_number),
            tracking.TAG_SEED: str(self.seed),
            tracking.TAG_WORKER: worker_name(),
            **self.environment,
        }

    def params(self, sizes: dict[str, int]) -> dict[str, Any]:
        o = self.options
        return {
            **self.config.as_params(),
            "seed": self.seed,
            "prints": o.prints,
            "max_train_images": o.max_train_images,
            "max_eval_images": o.max_eval_images,
            "deterministic": o.deterministic,
            **self.settings.as_params(),
            **sizes,
        }

    def run(
        self,
        observers: list[Any],
        on_start: Callable[[str], None] | None = None,
        still_ours: Callable[[], bool] | None = None,
    ) -> NetOutcome:
        """Train the net in its own MLflow run. `still_ours` is asked before the result is
        written: False (the trial was given to another worker) ends the run FAILED instead."""
        from nws import tracking
        from nws.data import load_images, split_for_net
        from nws.snapshots import SnapshotRecorder, layout_document, weight_layout
        from nws.training import TrainingDiverged, train_net

        o = self.options
        images = load_images(self.config.dataset, o.data_dir or None, o.download)
        data = split_for_net(
            images, self.seed, o.max_train_images, o.max_eval_images, fidelity=self.settings.fidelity
        )
        layout = weight_layout(self.config)
        run_id = tracking.start_net_run(
            f"net-{o.campaign}-{self.trial_number:05d}",
            self.tags(),
            self.params(data.sizes()),
            parent_run_id=o.parent_run_id or None,
        )
        try:  # straight after: nothing between that a stop signal could cut
            if on_start is not None:
                on_start(run_id)
            with SnapshotRecorder(layout) as recorder:

                def capture(model: Any, epoch: int, metrics: dict[str, float]) -> None:
                    recorder.record(model, epoch, metrics)
                    tracking.log_epoch(epoch, metrics)

                try:
                    result = train_net(self.config, data, self.seed, self.settings, [capture, *observers])
                except TrainingDiverged as diverged:
                    tracking.end_run("FAILED", {tracking.TAG_FAILURE: f"nan_loss: {diverged}"})
                    return NetOutcome(run_id, False, epochs=diverged.epoch, failure=str(diverged))
                weights, snapshots = recorder.select(o.prints)
            if still_ours is not None and not still_ours():
                tracking.end_run("FAILED", {tracking.TAG_FAILURE: TAKEN_OVER})
                return NetOutcome(run_id, False, epochs=result.epochs, failure=TAKEN_OVER)
            final = result.history[-1]
            tracking.log_net_result(
                weights,
                layout_document(self.config, layout, snapshots),
                result.history,
                {
                    "epochs": result.epochs,
                    "train_seconds": result.seconds,
                    "weightn_conv": layout.weightn_conv,
                    "weightn_fc": layout.weightn_fc,
                    "steps_per_epoch": result.steps_per_epoch,
                },
                {tracking.TAG_STOP_REASON: result.stop_reason},
            )
            tracking.end_run("FINISHED")
        except BaseException as error:
            tracking.abort_run(run_id, error)
            raise
        return NetOutcome(run_id, True, final["test_accuracy"], result.epochs)
