"""Gradient-boosting baselines on weight statistics (scikit-learn's histogram gradient boosting).

`stats` sees exactly what the DMC sees, a slice, through its statistics. `layer_stats` sees the
statistics of every layer tensor of the whole snapshot; it needs one shared architecture.

The fitted estimator is saved with skops, whose loader builds only the types it is told to trust
and calls none of the file's code; a pickle (joblib) would run whatever the file says.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from nws.errors import DataError, one_line
from nws.meta.base import MetaClassifier, snapshot_features, to_probabilities
from nws.meta.features import slice_statistics
from nws.meta.samples import Samples

MAX_ITER = 300
ESTIMATOR_SUFFIX = ".skops"
TRUSTED_TYPES = ("sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",)
"""The one type a fitted HistGradientBoostingClassifier or Regressor holds (checked on
scikit-learn 1.9) beyond those skops trusts by default: numpy arrays and random generators,
builtin containers, and scikit-learn's estimators, losses, link functions and bin mapper.
`skops.io.load` checks every type the file names against both lists before it builds anything."""


def _estimator_class(regression: bool) -> type:
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor

    return HistGradientBoostingRegressor if regression else HistGradientBoostingClassifier


def _estimator(regression: bool, seed: int, n_samples: int) -> Any:
    # scikit-learn's default leaf size (20) cannot split a zoo of a few dozen snapshots at all.
    leaf = max(2, min(20, n_samples // 20))
    common = {"max_iter": MAX_ITER, "early_stopping": False, "random_state": seed,
              "min_samples_leaf": leaf}  # fmt: skip
    if regression:
        return _estimator_class(True)(loss="absolute_error", **common)
    return _estimator_class(False)(**common)


class _GradientBoosting(MetaClassifier):
    estimator: Any = None

    def _fit_features(self, features: np.ndarray, labels: np.ndarray) -> None:
        self.estimator = _estimator(self.task.is_regression, self.settings.seed, len(features))
        targets = self.task.scale(labels) if self.task.is_regression else labels
        self.estimator.fit(features, targets)

    def _predict_features(self, features: np.ndarray) -> np.ndarray:
        if self.task.is_regression:
            return self.task.unscale(self.estimator.predict(features))
        return to_probabilities(self.estimator, features, len(self.task.classes))

    def _save_model(self, directory: Path) -> None:
        import skops.io

        skops.io.dump(self.estimator, directory / f"{self.name}{ESTIMATOR_SUFFIX}")

    def _load_model(self, directory: Path) -> None:
        import skops.io

        path = directory / f"{self.name}{ESTIMATOR_SUFFIX}"
        if not path.exists() and (directory / f"{self.name}.joblib").exists():
            raise DataError(
                f"{self.name}.joblib: saved by an older nws as a pickle, which nws no longer loads "
                "(loading a pickle runs code from the file); retrain the model"
            )
        try:
            estimator = skops.io.load(path, trusted=list(TRUSTED_TYPES))
        except Exception as e:  # a parser of untrusted input: any failure means a bad file
            raise DataError(
                f"{path.name}: not a gradient-boosting estimator nws can load ({one_line(e)})"
            ) from None
        expected = _estimator_class(self.task.is_regression)
        if type(estimator) is not expected:
            raise DataError(
                f"{path.name}: holds a {type(estimator).__name__}, expected a {expected.__name__}"
            )
        self.estimator = estimator


class SliceStatsModel(_GradientBoosting):
    """Statistics of random slices (`stats_slices` per training snapshot)."""

    name = "stats"

    def fit(self, train: Samples, valid: Samples) -> None:
        rng = np.random.default_rng(self.settings.seed)
        index = np.repeat(np.arange(len(train)), self.settings.stats_slices)
        features = slice_statistics(train.random_slices(index, rng))
        self._fit_features(features, train.label[index])

    def predict_slices(self, x: np.ndarray) -> np.ndarray:
        return self._predict_features(slice_statistics(x))


class LayerStatsModel(_GradientBoosting):
    """Statistics of every layer tensor (in the region) of the whole snapshot."""

    name = "layer_stats"
    uses_slices = False

    def _features(self, vectors: np.ndarray) -> np.ndarray:
        assert self.layout is not None
        vectors = np.atleast_2d(vectors)
        if vectors.shape[1] != self.layout.n_weights:
            raise ValueError(
                f"layer_stats expects vectors of {self.layout.n_weights} weights, got {vectors.shape[1]}"
            )
        return snapshot_features(vectors, self.layout, self.settings.region)

    def fit(self, train: Samples, valid: Samples) -> None:
        vectors = np.stack([train.zoo.snapshot(n, k) for n, k in zip(train.net, train.k, strict=True)])
        self._fit_features(self._features(vectors), train.label)

    def predict_snapshots(self, vectors: np.ndarray) -> np.ndarray:
        return self._predict_features(self._features(vectors))
