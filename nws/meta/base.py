"""What every meta-classifier shares: the task (`Task`), its settings (`MetaSettings`), the
interface (`MetaClassifier`: fit, predict slices or snapshots, save) and helpers of its models.
The models are `nws.meta.dmc` and `nws.meta.baselines`; `nws.meta.create` and `nws.meta.load` make
them by name.

Each predicts a property from weights: class probabilities, or the learning rate (regressed with
an L1 loss on the rate scaled to [0, 1] by the space's range, reported in the original units).

A saved model is data only: `meta.json` and the estimator's file, loaded without running code
from them (`nws.meta.load`).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from nws.meta.features import layer_statistics
from nws.meta.samples import Samples
from nws.net.regions import region_positions
from nws.net.snapshots import WeightLayout, vector_layout
from nws.space import value_range


@dataclass(frozen=True)
class Task:
    """What a meta-classifier predicts."""

    prop: str
    classes: tuple[str, ...] = ()  # empty: regression of the learning rate

    @property
    def is_regression(self) -> bool:
        return not self.classes

    def scale(self, values: np.ndarray) -> np.ndarray:
        low, high = value_range(self.prop)
        return (np.asarray(values, np.float64) - low) / (high - low)

    def unscale(self, values: np.ndarray) -> np.ndarray:
        """Back to the property's units, clipped to its range (the rate, an accuracy are bounded)."""
        low, high = value_range(self.prop)
        return np.clip(np.asarray(values, np.float64), 0.0, 1.0) * (high - low) + low


SELECT_BY = ("loss", "accuracy")


@dataclass(frozen=True)
class MetaSettings:
    """Settings that shape a meta-classifier (logged as params)."""

    slice_length: int = 5000
    region: str = "all"
    epochs: int = 50  # passes over the training samples: the invariant model, and the DMC at steps=0
    steps: int = 2000
    """The DMC's budget in optimizer steps, whatever the zoo's size; 0: the paper's schedule
    (`epochs` passes over the training samples, a constant learning rate, the last weights)."""
    validate_every: int = 100  # DMC steps between two validations (the steps budget only)
    patience: int = 8
    """Validations without a better one (`select_by`) before the DMC stops (0: never); it keeps the
    weights of its best validation either way."""
    select_by: str = "accuracy"  # one of SELECT_BY
    """What the DMC's validations compare to keep its best weights: the validation slices'
    `accuracy` (classification; regression compares the loss), or their `loss`. With a few
    validation nets the loss rose after step 100 on the default zoo (confident on the nets it
    already read) and kept those weights (initialisation 0.875 per net on one split); the
    accuracy kept step 1,000's (1.000), and 0.958 on the other split (loss: 1.000);
    benchmarks/dmc_steps.py --set select_by=loss."""
    normalize: bool = True  # the DMC sees weights scaled to their typical size, then softsign
    batch_size: int = 64
    learning_rate: float = 1e-3  # Adam's; the DMC's peak, cosine-decayed over `steps`
    stats_slices: int = 16  # random slices per training snapshot for the stats model
    seed: int = 0
    save_optimizer: bool = False  # keep a Keras model's optimizer state (2x its weights) in its file


@dataclass
class MetaClassifier(ABC):
    """Base: fit on samples, predict slices (or whole snapshots), save and load."""

    task: Task
    settings: MetaSettings
    layout: WeightLayout | None = None  # the shared architecture (layer_stats; an imported zoo's)
    history: dict[str, list[float]] = field(default_factory=dict)
    fit_metrics: dict[str, float] = field(default_factory=dict)  # how the fit went (steps taken...)
    name: ClassVar[str] = ""
    uses_slices: ClassVar[bool] = True

    @abstractmethod
    def fit(self, train: Samples, valid: Samples) -> None:
        """Train on the training samples; the validation samples are for monitoring."""

    def predict_slices(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities [n, C], or learning rates [n], from slices [n, slice_length]."""
        raise TypeError(f"{self.name} predicts whole snapshots, not slices")

    def predict_snapshots(self, vectors: np.ndarray) -> np.ndarray:
        """Class probabilities [n, C], or learning rates [n], from whole flat vectors."""
        raise TypeError(f"{self.name} predicts slices, not whole snapshots")

    def predict_vector(self, vector: np.ndarray, slices: int = 64) -> np.ndarray:
        """Probabilities (or the learning rate) for one whole flat vector: `slices` evenly spaced
        slices of the region, their predictions averaged (the per-net protocol)."""
        vector = np.asarray(vector, dtype=np.float32).ravel()
        if not self.uses_slices:
            return self.predict_snapshots(vector[None])[0]
        layout = vector_layout(len(vector), self.layout)  # an imported zoo's, else the NWS family's
        values = vector[region_positions(len(vector), layout.weightn_conv, self.settings.region, layout)]
        length = self.settings.slice_length
        if len(values) < length:
            raise ValueError(f"the {self.settings.region} part ({len(values)}) is shorter than a slice")
        starts = np.round(np.linspace(0, len(values) - length, slices)).astype(np.int64)
        window = np.lib.stride_tricks.sliding_window_view(values, length)
        return self.predict_slices(window[starts]).mean(axis=0)

    def label(self, output: np.ndarray) -> str | float:
        """The readable value of a prediction."""
        if self.task.is_regression:
            return float(output)
        return self.task.classes[int(np.argmax(output))]

    @abstractmethod
    def _save_model(self, directory: Path) -> None:
        """Write the fitted estimator's files into `directory`."""

    @abstractmethod
    def _load_model(self, directory: Path) -> None:
        """Read what `_save_model` wrote, running no code from it; DataError otherwise."""

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        meta = {
            "model": self.name,
            "task": asdict(self.task),
            "settings": asdict(self.settings),
            "layout": self.layout.to_records() if self.layout else None,
        }
        (directory / "meta.json").write_text(json.dumps(meta, indent=1))
        self._save_model(directory)


def to_probabilities(model: Any, features: np.ndarray, n_classes: int) -> np.ndarray:
    """predict_proba with a column for every class, also ones the estimator never saw."""
    proba = model.predict_proba(features)
    out = np.zeros((len(features), n_classes))
    out[:, model.classes_.astype(int)] = proba
    return out


def snapshot_features(vectors: np.ndarray, layout: WeightLayout, region: str) -> np.ndarray:
    entries = [e for e in layout if e.in_region(region)]
    return layer_statistics(vectors, entries)
