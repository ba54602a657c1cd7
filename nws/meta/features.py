"""Weight statistics, the features of the field's standard baseline (e.g. Unterthiner et al.,
"Predicting neural network accuracy from weights"): per slice, or per layer tensor of a whole
snapshot when all nets share one architecture."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from nws.net.snapshots import TensorEntry

QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)
SLICE_FEATURES = (
    "mean", "std", "q00", "q05", "q25", "q50", "q75", "q95", "q100",
    "mean_abs", "rms", "skewness", "kurtosis",
)  # fmt: skip
LAYER_FEATURES = ("mean", "std", "q00", "q25", "q50", "q75", "q100")


def slice_statistics(x: np.ndarray) -> np.ndarray:
    """[n, len(SLICE_FEATURES)] statistics of each row of x."""
    x = np.asarray(x, dtype=np.float64)
    mean = x.mean(axis=1)
    centred = x - mean[:, None]
    var = (centred**2).mean(axis=1)
    std = np.sqrt(var)
    safe = np.where(std > 0, std, 1.0)
    skew = np.where(std > 0, (centred**3).mean(axis=1) / safe**3, 0.0)
    kurt = np.where(std > 0, (centred**4).mean(axis=1) / safe**4, 0.0)
    quantiles = np.quantile(x, QUANTILES, axis=1).T
    return np.column_stack(
        [mean, std, quantiles, np.abs(x).mean(axis=1), np.sqrt((x**2).mean(axis=1)), skew, kurt]
    ).astype(np.float32)


def layer_statistics(vectors: np.ndarray, entries: Sequence[TensorEntry]) -> np.ndarray:
    """[n, len(entries) * len(LAYER_FEATURES)]: statistics of every listed tensor."""
    vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float64))
    columns = []
    for entry in entries:
        part = vectors[:, entry.offset : entry.stop]
        columns.append(part.mean(axis=1))
        columns.append(part.std(axis=1))
        columns.extend(np.quantile(part, (0.0, 0.25, 0.5, 0.75, 1.0), axis=1))
    return np.column_stack(columns).astype(np.float32)
