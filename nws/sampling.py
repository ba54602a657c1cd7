"""A sampling campaign: Optuna hands out configurations (ask/tell on a shared study), each net is
trained with snapshot capture and becomes one MLflow run nested under the campaign's run.

The Optuna study is a second view of the campaign: each trial holds the net's MLflow run id and is
told the net's final test accuracy (or fails).
"""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nws import __version__, space
from nws.errors import ParameterError
from nws.params import at_least, param
from nws.space import NetConfig

DEFAULT_STORAGE = "optuna-journal.log"
STUDY_ATTRS = ("subset", "datasets")
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
    deterministic: bool = param(True, "TensorFlow op determinism (bit-identical on CPU)")

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
        if not self.campaign.strip():
            raise ParameterError("campaign", "must not be empty")
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


def open_storage(url: str) -> Any:
    """An Optuna storage from a URL: RDB URLs (sqlite:///, postgresql://, ...) as RDBStorage,
    `journal:<path>` or a path as a JournalStorage file (several processes on one machine)."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    url = url.strip() or DEFAULT_STORAGE
    if "://" in url:
        tracking = os.environ.get("MLFLOW_TRACKING_URI", "")
        if tracking and tracking.rstrip("/") == url.rstrip("/"):
            raise ParameterError(
                "storage", "must not be MLflow's database (both keep an alembic_version table)"
            )
        try:
            return optuna.storages.RDBStorage(url)
        except Exception as e:  # SQLAlchemy raises many types for bad URLs or servers
            raise ParameterError("storage", f"cannot open {url}: {type(e).__name__}: {e}") from None
    path = Path(url.removeprefix("journal:")).expanduser()
    if not path.parent.is_dir():
        raise ParameterError("storage", f"directory {path.parent} does not exist")
    return JournalStorage(JournalFileBackend(str(path)))


def open_study(options: SampleOptions, datasets: list[str]) -> Any:
    """Create or continue the campaign's study; refuse a continuation with another space."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(options.storage)
    study = optuna.create_study(
        study_name=options.campaign,
        storage=storage,
        direction="maximize",
        sampler=space.TrialSeededSampler(options.seed),
        load_if_exists=True,
    )
    wanted = {"subset": options.subset, "datasets": ",".join(datasets)}
    existing = study.user_attrs
    if not any(k in existing for k in STUDY_ATTRS):
        for key, value in wanted.items():
            study.set_user_attr(key, value)
        study.set_user_attr("seed", options.seed)
    else:
        for key, value in wanted.items():
            if existing.get(key) != value:
                raise ParameterError(
                    key,
                    f"campaign {options.campaign!r} was started with {key}={existing.get(key)}; "
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
    """Train `n_nets` nets of a campaign; every net is an MLflow run and an Optuna trial."""
    datasets, replay = options.validate()
    from nws.data import check_available

    data_dir = options.data_dir or None
    check_available(datasets, data_dir, options.download)
    study = open_study(options, datasets)

    import mlflow

    from nws import tracking
    from nws.training import TrainSettings, configure_tensorflow

    configure_tensorflow(deterministic=options.deterministic)
    settings = TrainSettings(
        max_epochs=options.max_epochs,
        min_epochs=options.min_epochs,
        lr_decay=options.lr_decay,
        mixed_precision=options.mixed_precision,
    )
    campaign_params = asdict(options)
    owns_run = mlflow.active_run() is None
    run = tracking.start_campaign_run(_campaign_tags(options), campaign_params)
    summary = CampaignSummary(options.campaign, campaign_run_id=run.info.run_id)
    try:
        _train_nets(options, settings, study, datasets, replay, summary)
    except BaseException as error:
        if owns_run:
            mlflow.end_run("KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
        raise
    mlflow.set_tags({"nws.finished_nets": str(len(summary.finished))})
    if owns_run:
        mlflow.end_run()
    return summary


def _train_nets(
    options: SampleOptions,
    settings: Any,
    study: Any,
    datasets: list[str],
    replay: NetConfig | None,
    summary: CampaignSummary,
) -> None:
    from nws.progress import Progress

    environment = _environment_tags()
    progress = Progress(options.n_nets)
    try:
        for index in range(1, options.n_nets + 1):
            if replay is not None:
                study.enqueue_trial(replay.as_dict())
            trial = study.ask()
            config = space.suggest(trial, options.subset, datasets)
            net = NetJob(options, settings, trial.number, config, datasets, environment)
            progress.start_net(index, net.label, settings.max_epochs)
            trial.set_user_attr("seed", net.seed)
            try:
                outcome = net.run(observers=[progress.epoch])
            except BaseException:
                study.tell(trial, state=optuna_state("FAIL"))
                raise
            trial.set_user_attr("mlflow_run_id", outcome.run_id)
            if outcome.finished:
                study.tell(trial, outcome.test_accuracy)
                summary.finished.append(outcome.run_id)
            else:
                trial.set_user_attr("failure", outcome.failure)
                study.tell(trial, state=optuna_state("FAIL"))
                summary.failed.append(outcome.run_id)
            progress.end_net(outcome.line(index, options.n_nets))
    finally:
        progress.close()


def optuna_state(name: str) -> Any:
    import optuna

    return getattr(optuna.trial.TrialState, name)


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

    def run(self, observers: list[Any]) -> NetOutcome:
        from nws import tracking
        from nws.data import load_images, split_for_net
        from nws.snapshots import SnapshotRecorder, layout_document, weight_layout
        from nws.training import TrainingDiverged, train_net

        o = self.options
        images = load_images(self.config.dataset, o.data_dir or None, o.download)
        data = split_for_net(images, self.seed, o.max_train_images, o.max_eval_images)
        layout = weight_layout(self.config)
        run = tracking.start_net_run(
            f"net-{o.campaign}-{self.trial_number:05d}", self.tags(), self.params(data.sizes())
        )
        run_id = run.info.run_id
        try:
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
            status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
            tracking.end_run(status, {tracking.TAG_FAILURE: f"{type(error).__name__}: {error}"[:500]})
            raise
        return NetOutcome(run_id, True, final["test_accuracy"], result.epochs)
