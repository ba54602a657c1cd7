"""The `sample` entry point: train nets of a campaign. Its parameters, checked here and turned
into `CampaignSettings`; the campaign itself runs in `nws.campaign`, in this process or (with
`workers` > 1) in worker processes supervised by `nws.commands.workers`."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from nws import space
from nws.backend import BACKENDS, BY_NAME, DEFAULT_BACKEND, named, select
from nws.campaign.loop import CampaignSummary
from nws.campaign.settings import CampaignSettings
from nws.campaign.storage import DEFAULT_STORAGE
from nws.checks import SEED, Count, Real, RunId
from nws.commands.options import check_campaign, check_declared, default_of, param
from nws.errors import ParameterError
from nws.net.fidelity import check_fidelity
from nws.net.training import TrainSettings
from nws.space import NetConfig


@dataclass(frozen=True)
class SampleOptions:
    """The parameters of the `sample` entry point."""

    n_nets: int = param(1, "nets to train in this call", Count(1))
    subset: str = param("main", "fixed (architecture pinned) or main (architecture drawn too)")
    datasets: str = param("offline", "comma list of datasets to draw from; 'offline' or 'paper' name groups")
    prints: int = param(20, "snapshots kept per net (>= 2)", Count(2))
    max_epochs: int = param(default_of(TrainSettings, "max_epochs"), "most epochs per net", Count(0))
    min_epochs: int = param(
        default_of(TrainSettings, "min_epochs"), "epochs before early stopping may stop a net", Count(0)
    )
    seed: int = param(0, "campaign seed: hyper-parameters and net seeds derive from it", SEED)
    campaign: str = param("default", "campaign name: the Optuna study and the nws.campaign tag")
    experiment: str = param(
        "",
        "MLflow experiment of the runs (default $MLFLOW_EXPERIMENT_NAME or $MLFLOW_EXPERIMENT_ID, else nws)",
    )
    storage: str = param(
        "", f"Optuna storage: an RDB URL or a journal file path (default ./{DEFAULT_STORAGE})"
    )
    data_dir: str = param(
        "",
        "root of the datasets' official files (default $NWS_DATA_DIR, else ~/.cache/nws/data)",
    )
    download: bool = param(True, "download missing paper datasets")
    max_train_images: int = param(0, "cap on training images per net (0 = all)", Count(0))
    max_eval_images: int = param(0, "cap on validation and test images per net (0 = all)", Count(0))
    config: str = param(
        "", "replay one configuration: name=value,... (all 13) or 13 values in NWS column order"
    )
    lr_decay: float = param(
        default_of(TrainSettings, "lr_decay"),
        "per-epoch learning-rate factor (1.0 = constant, as published)",
        Real(0.0, 1.0, low_open=True),
    )
    mixed_precision: bool = param(
        default_of(TrainSettings, "mixed_precision"), "train in mixed float16 (GPU)"
    )
    fidelity: str = param(
        default_of(TrainSettings, "fidelity"),
        "paper (train as the released code did) or clean (Keras defaults, clean evaluation)",
    )
    deterministic: bool = param(True, "op determinism (bit-identical on CPU)")
    backend: str = param(DEFAULT_BACKEND, f"Keras backend that trains the nets: {' or '.join(BACKENDS)}")
    pack: int = param(1, "nets trained together in one compiled step (backend jax; 1 on a CPU)", Count(1))
    target: int = param(
        0, "finished nets the campaign should hold; workers train until then (0: n_nets)", Count(0)
    )
    workers: int = param(1, "worker processes on this machine, all on the same campaign", Count(1))
    threads: int = param(
        1,
        "CPU threads per worker (0: the cores split between workers); a net's last bits depend on it, "
        "so a fixed count gives the same nets with any number of workers",
        Count(0),
    )
    heartbeat: int = param(
        30, "seconds between heartbeats on an RDB storage; a trial silent for 2x this is retried", Count(1)
    )
    parent_run_id: str = param(
        "", "MLflow run to nest the nets under (set for the workers of --workers)", RunId()
    )

    def settings(self) -> CampaignSettings:
        """Check every parameter; the campaign they describe."""
        from nws.campaign.storage import check_storage
        from nws.data import resolve_datasets

        check_declared(self)
        space.check_subset(self.subset)
        if self.min_epochs > self.max_epochs:
            raise ParameterError(
                "min_epochs", f"{self.min_epochs} is larger than max_epochs ({self.max_epochs})"
            )
        check_fidelity(self.fidelity)
        check_campaign(self.campaign)
        backend = named(self.backend)
        if self.pack > 1:
            if not backend.packs:
                packing = " or ".join(name for name, b in BY_NAME.items() if b.packs)
                raise ParameterError("pack", f"{self.pack} needs backend {packing} (got {self.backend})")
            if self.lr_decay != 1.0 or self.mixed_precision:
                raise ParameterError("pack", f"{self.pack} needs lr_decay 1.0 and mixed_precision false")
        storage = check_storage(self.storage)
        datasets = resolve_datasets(self.datasets)
        replay = None
        if self.config.strip():
            replay = NetConfig.parse(self.config)
            if replay.dataset not in datasets:
                datasets = resolve_datasets(replay.dataset)
            replay.check(self.subset, datasets)
        train = TrainSettings(
            max_epochs=self.max_epochs,
            min_epochs=self.min_epochs,
            lr_decay=self.lr_decay,
            mixed_precision=self.mixed_precision,
            fidelity=self.fidelity,
        )
        return CampaignSettings(
            name=self.campaign, subset=self.subset, datasets=tuple(datasets), replay=replay, train=train,
            prints=self.prints, seed=self.seed, n_nets=self.n_nets, target=self.target, storage=storage,
            heartbeat=self.heartbeat, data_dir=self.data_dir or None, download=self.download,
            max_train_images=self.max_train_images, max_eval_images=self.max_eval_images,
            deterministic=self.deterministic, threads=self.threads, parent_run_id=self.parent_run_id,
            backend=self.backend, pack=self.pack,
            experiment=self.experiment,
        )  # fmt: skip


def run_campaign(options: SampleOptions) -> CampaignSummary:
    """Train a campaign's nets: `n_nets` in this call, or until the campaign holds `target`
    finished nets; with `workers` > 1, in that many processes. Every net is an MLflow run and an
    Optuna trial."""
    from nws.campaign.loop import open_campaign, train_campaign

    settings = options.settings()
    select(settings.backend)  # before anything imports Keras
    study = open_campaign(settings)
    if options.workers > 1:
        from nws.commands.workers import run_workers

        return run_workers(settings, asdict(options), options.workers, study)
    return train_campaign(settings, study, asdict(options))
