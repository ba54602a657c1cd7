"""Scores of a regressed snapshot target (a net's test accuracy, its generalisation gap): the
field's rank correlation, Kendall's tau (scipy), beside R2 and the mean absolute error, each with a
95 % percentile-bootstrap interval that resamples test *nets* (snapshots of one net are not
independent; with one snapshot per net in K this is the plain bootstrap over nets).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from nws.meta.statistics import CONFIDENCE

SCORES = ("tau", "r2", "mae")
BOOTSTRAP_RESAMPLES = 2000
"""Resamples per interval: the percentile bounds move by under 0.01 beyond this on a few dozen
test nets, and three scores per (property, model) stay quick."""


def kendall_tau(truth: np.ndarray, prediction: np.ndarray) -> float:
    """Kendall's tau-b (ties counted); NaN when either side is constant."""
    from scipy.stats import kendalltau

    if len(truth) < 2 or np.ptp(truth) == 0 or np.ptp(prediction) == 0:
        return float("nan")
    return float(kendalltau(truth, prediction).statistic)


def r2(truth: np.ndarray, prediction: np.ndarray) -> float:
    """Coefficient of determination: 1 - SSE / SST (NaN when the truth is constant)."""
    total = float(np.sum((truth - truth.mean()) ** 2))
    if total == 0:
        return float("nan")
    return 1.0 - float(np.sum((truth - prediction) ** 2)) / total


def mae(truth: np.ndarray, prediction: np.ndarray) -> float:
    return float(np.mean(np.abs(truth - prediction)))


SCORE_FUNCTIONS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "tau": kendall_tau,
    "r2": r2,
    "mae": mae,
}


def _percentiles(values: list[float], confidence: float) -> tuple[float, float]:
    finite = np.array([v for v in values if math.isfinite(v)])
    if not len(finite):
        return float("nan"), float("nan")
    tail = (1.0 - confidence) / 2 * 100
    low, high = np.percentile(finite, [tail, 100 - tail])
    return float(low), float(high)


def regression_scores(
    truth: np.ndarray,
    prediction: np.ndarray,
    nets: np.ndarray,
    *,
    seed: int = 0,
    resamples: int = BOOTSTRAP_RESAMPLES,
    confidence: float = CONFIDENCE,
) -> dict[str, float]:
    """`tau`, `r2`, `mae` over the test snapshots, each with `<score>_ci_low` and `<score>_ci_high`:
    the percentile interval of the score over `resamples` resamples of the test nets (`nets`: the
    net of each snapshot), drawn with replacement and seeded."""
    truth, prediction = np.asarray(truth, np.float64), np.asarray(prediction, np.float64)
    nets = np.asarray(nets)
    groups = [np.flatnonzero(nets == n) for n in np.unique(nets)]
    rng = np.random.default_rng([seed, len(truth)])
    draws = [np.concatenate([groups[g] for g in rng.integers(0, len(groups), len(groups))])
             for _ in range(resamples if len(groups) > 1 else 0)]  # fmt: skip
    out: dict[str, float] = {}
    for name, score in SCORE_FUNCTIONS.items():
        out[name] = score(truth, prediction)
        out[f"{name}_ci_low"], out[f"{name}_ci_high"] = (
            _percentiles([score(truth[d], prediction[d]) for d in draws], confidence)
            if draws
            else (out[name], out[name])
        )
    return out
