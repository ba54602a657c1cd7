"""A campaign's settings, checked and resolved: what the campaign modules run on. `nws sample`
builds them from its options (`nws.commands.sample`), where the parameters and their defaults
are declared."""

from __future__ import annotations

from dataclasses import dataclass

from nws.backend import DEFAULT_BACKEND
from nws.net.training import TrainSettings
from nws.space import NetConfig


@dataclass(frozen=True, kw_only=True)
class CampaignSettings:
    """One campaign: which nets it draws, how each is trained and kept, and where it is stored."""

    name: str  # the Optuna study name and the nws.campaign tag
    subset: str  # fixed or main
    datasets: tuple[str, ...]  # dataset names, resolved from groups
    replay: NetConfig | None  # one configuration trained by every trial of this call, or None
    train: TrainSettings  # how each net trains
    prints: int  # snapshots kept per net
    seed: int  # trial n draws from (seed, n) and trains with seed + n
    n_nets: int  # nets to train in this call (without a target)
    target: int  # finished nets the campaign should hold (0: n_nets in this call)
    storage: str  # the Optuna storage: an RDB URL or a journal file path
    heartbeat: int  # seconds between a running trial's heartbeats (RDB storages)
    data_dir: str | None  # root of the paper datasets' files (None: the default)
    download: bool  # download missing paper datasets
    max_train_images: int  # cap on training images per net (0: all)
    max_eval_images: int  # cap on validation and test images per net (0: all)
    deterministic: bool  # TensorFlow op determinism
    threads: int  # TensorFlow CPU threads (0: TensorFlow's choice)
    parent_run_id: str  # the run to nest nets under, held by another process ("": this one's)
    backend: str = DEFAULT_BACKEND  # the Keras backend that trains the nets (nws.backend)
    pack: int = 1  # nets trained together in one compiled step (JAX; nws.net.pack)
    experiment: str = ""  # the MLflow experiment option ("": nws.tracking.experiments' rule)

    @property
    def heartbeat_enabled(self) -> bool:
        """Heartbeats need an RDB storage (Optuna's journal storage has none)."""
        return "://" in self.storage
