"""Honest statistics for a meta-classifier's score on held-out nets (issue 14).

The unit of evidence is the test *net*: slices and snapshots of one net are not independent
samples, so every interval and every test here counts nets (n = number of test nets).

- Classification: the per-net accuracy k/n with a two-sided 95 % Wilson score interval (exact
  Clopper-Pearson on request), and a one-sided exact binomial test over the test nets,
  H0: per-net accuracy = chance, H1: it is greater.
- The learning rate (regression): the per-net MAE with a two-sided 95 % percentile-bootstrap
  interval (resampling nets, seeded), and a one-sided paired sign-flip permutation test over the
  test nets on d_i = |error of the constant guess on net i| - |error of the model on net i|,
  statistic mean(d) = MAE(constant) - MAE(model), H0: d is symmetric around 0, H1: the model's
  error is smaller. The test enumerates all 2^n sign patterns when 2^n <= `resamples`, otherwise
  it draws `resamples` seeded patterns.

Nothing is called learned unless its p-value is below `ALPHA` (0.01). With many (property,
model) pairs in one campaign, some p-values below 0.01 are expected by chance alone (about one
in a hundred pairs where nothing is encoded); the p-values are reported unadjusted.

numpy and scipy only: no MLflow, no Keras, so the numbers can be checked quickly and in isolation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from nws.errors import DataError, ParameterError

ALPHA = 0.01
CONFIDENCE = 0.95
RESAMPLES = 10_000
NOT_SIGNIFICANT = "not significant"
# Interval methods by the name a user reads, mapped to scipy's BinomTestResult.proportion_ci names.
INTERVALS = {"wilson": "wilson", "clopper-pearson": "exact"}


def verdict(pvalue: float, alpha: float = ALPHA) -> str:
    """The word the table and the dissection print: only a significant result is 'learned'."""
    if math.isfinite(pvalue) and pvalue < alpha:
        return f"learned (p<{alpha:g})"
    return NOT_SIGNIFICANT


@dataclass(frozen=True)
class NetStatistics:
    """One (property, model) score over its test nets, with its interval and its test.

    `measure` is "accuracy" (higher is better, `baseline` = chance) or "mae" (lower is better,
    `baseline` = the constant guess's MAE over the same test nets).
    """

    measure: str
    n: int
    estimate: float
    ci_low: float
    ci_high: float
    pvalue: float
    baseline: float
    alpha: float = ALPHA

    @property
    def significant(self) -> bool:
        return math.isfinite(self.pvalue) and self.pvalue < self.alpha

    @property
    def verdict(self) -> str:
        return verdict(self.pvalue, self.alpha)

    @property
    def estimate_column(self) -> str:
        """The results table's column of the estimate (the campaign's existing names)."""
        return "net_accuracy" if self.measure == "accuracy" else "net_mae"

    @property
    def baseline_column(self) -> str:
        return "chance" if self.measure == "accuracy" else "constant_guess_mae"

    def parent_metrics(self, prop: str, model: str) -> dict[str, float]:
        """The parent run's metrics named as issue 14 fixes them.

        Classification: netacc_<prop>_<model>, ci_low_…, ci_high_…, pvalue_…, n_test_nets_<prop>.
        Learning rate: "mae" in place of "acc", i.e. netmae_lrate_<model> (the per-net MAE, the
        name the campaign already logs it under; mae_lrate_<model> stays the slice MAE).
        """
        estimate = "netacc" if self.measure == "accuracy" else "netmae"
        return {
            f"{estimate}_{prop}_{model}": self.estimate,
            f"ci_low_{prop}_{model}": self.ci_low,
            f"ci_high_{prop}_{model}": self.ci_high,
            f"pvalue_{prop}_{model}": self.pvalue,
            f"n_test_nets_{prop}": float(self.n),
        }

    def run_metrics(self) -> dict[str, float]:
        """The same statistics for the (property, model) child run, beside its net_accuracy or
        net_mae, under the results table's column names. Classification and learning-rate runs
        share these names, so comparing any two child runs shows no column empty by design."""
        return {
            "ci_low": self.ci_low,
            "ci_high": self.ci_high,
            "pvalue": self.pvalue,
            "n_test_nets": float(self.n),
        }

    def row(self) -> dict[str, Any]:
        """The columns this adds to a results.csv row (and that `format_statistics_table` reads)."""
        return {
            "n_test_nets": self.n,
            self.estimate_column: self.estimate,
            "ci_low": self.ci_low,
            "ci_high": self.ci_high,
            self.baseline_column: self.baseline,
            "pvalue": self.pvalue,
            "significant": self.significant,
            "verdict": self.verdict,
        }


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ParameterError("confidence", f"{confidence} is not in (0, 1)")


def _check_alpha(alpha: float) -> None:
    if not 0.0 < alpha < 1.0:
        raise ParameterError("alpha", f"{alpha} is not in (0, 1)")


def count_statistics(
    correct: int,
    n: int,
    chance: float,
    *,
    confidence: float = CONFIDENCE,
    interval: str = "wilson",
    alpha: float = ALPHA,
) -> NetStatistics:
    """`correct` of `n` test nets right: the accuracy, its interval and the binomial p-value."""
    from scipy.stats import binomtest

    if n < 1:
        raise DataError(f"test nets: need at least one test net, got {n}")
    if not 0 <= correct <= n:
        raise DataError(f"test nets: {correct} correct of {n} is not a count between 0 and {n}")
    if not 0.0 < chance < 1.0:
        raise ParameterError("chance", f"{chance} is not in (0, 1)")
    if interval not in INTERVALS:
        raise ParameterError("interval", f"{interval!r} is not one of {', '.join(INTERVALS)}")
    _check_confidence(confidence)
    _check_alpha(alpha)
    test = binomtest(int(correct), int(n), chance, alternative="greater")
    # The interval is two-sided and does not depend on chance or on the test's alternative.
    ci = binomtest(int(correct), int(n)).proportion_ci(confidence, method=INTERVALS[interval])
    return NetStatistics(
        measure="accuracy",
        n=int(n),
        estimate=correct / n,
        ci_low=float(ci.low),
        ci_high=float(ci.high),
        pvalue=float(test.pvalue),
        baseline=float(chance),
        alpha=alpha,
    )


def accuracy_statistics(
    correct: ArrayLike,
    chance: float,
    *,
    confidence: float = CONFIDENCE,
    interval: str = "wilson",
    alpha: float = ALPHA,
) -> NetStatistics:
    """One boolean per test net (its aggregated prediction right or wrong)."""
    hits = np.asarray(correct)
    if hits.ndim != 1 or hits.dtype != bool:
        raise DataError(f"test nets: expected one boolean per net, got {hits.dtype} of shape {hits.shape}")
    return count_statistics(
        int(hits.sum()), len(hits), chance, confidence=confidence, interval=interval, alpha=alpha
    )


def bootstrap_mean_ci(
    values: ArrayLike, *, confidence: float = CONFIDENCE, resamples: int = RESAMPLES, seed: int = 0
) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of `values` (one per net), resampling nets."""
    from scipy.stats import bootstrap

    data = _per_net("values", values)
    _check_confidence(confidence)
    if resamples < 1:
        raise ParameterError("resamples", f"{resamples} is below 1")
    if len(data) == 1 or np.all(data == data[0]):
        # Every resample has the same mean: the interval is that point (scipy refuses n = 1).
        return float(data[0]), float(data[0])
    result = bootstrap(
        (data,),
        np.mean,
        n_resamples=resamples,
        confidence_level=confidence,
        method="percentile",
        vectorized=True,
        random_state=np.random.default_rng(seed),
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def sign_flip_pvalue(differences: ArrayLike, *, resamples: int = RESAMPLES, seed: int = 0) -> float:
    """One-sided paired permutation p-value that mean(differences) > 0 (H0: symmetric around 0).

    Exact (all 2^n sign patterns) when 2^n <= `resamples`, otherwise `resamples` seeded patterns.
    """
    from scipy.stats import permutation_test

    data = _per_net("differences", differences)
    if resamples < 1:
        raise ParameterError("resamples", f"{resamples} is below 1")
    if np.all(data == 0):
        return 1.0
    result = permutation_test(
        (data,),
        _mean,
        permutation_type="samples",
        n_resamples=resamples,
        alternative="greater",
        vectorized=True,
        random_state=np.random.default_rng(seed),
    )
    return float(result.pvalue)


def _mean(sample: np.ndarray, axis: int) -> np.ndarray:
    return np.mean(sample, axis=axis)


def mae_statistics(
    truth: ArrayLike,
    prediction: ArrayLike,
    constant_guess: float,
    *,
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    seed: int = 0,
    alpha: float = ALPHA,
) -> NetStatistics:
    """Per test net: the true value and the model's (net-aggregated) prediction; the constant
    guess is what a model that learned nothing predicts (the campaign uses the training median)."""
    truth = _per_net("truth", truth)
    prediction = _per_net("prediction", prediction)
    if truth.shape != prediction.shape:
        raise DataError(f"test nets: {len(truth)} true values but {len(prediction)} predictions")
    if not math.isfinite(constant_guess):
        raise ParameterError("constant_guess", f"{constant_guess} is not a finite number")
    _check_alpha(alpha)
    model_error = np.abs(prediction - truth)
    constant_error = np.abs(constant_guess - truth)
    low, high = bootstrap_mean_ci(model_error, confidence=confidence, resamples=resamples, seed=seed)
    return NetStatistics(
        measure="mae",
        n=len(truth),
        estimate=float(model_error.mean()),
        ci_low=low,
        ci_high=high,
        pvalue=sign_flip_pvalue(constant_error - model_error, resamples=resamples, seed=seed),
        baseline=float(constant_error.mean()),
        alpha=alpha,
    )


def per_net_statistics(
    per_net: Any,
    *,
    chance: float | None = None,
    constant_guess: float | None = None,
    seed: int = 0,
    confidence: float = CONFIDENCE,
    interval: str = "wilson",
    alpha: float = ALPHA,
) -> NetStatistics:
    """Statistics from an `Evaluation.per_net` table (one row per test net, `true_value` and
    `predicted_value`): give `chance` for a classification, `constant_guess` for the learning rate."""
    if (chance is None) == (constant_guess is None):
        raise ParameterError("chance", "give exactly one of chance (classification) or constant_guess")
    truth = np.asarray(per_net["true_value"])
    predicted = np.asarray(per_net["predicted_value"])
    if chance is not None:
        return accuracy_statistics(
            np.asarray(truth == predicted, dtype=bool),
            chance,
            confidence=confidence,
            interval=interval,
            alpha=alpha,
        )
    guess = float(constant_guess)
    return mae_statistics(truth, predicted, guess, confidence=confidence, seed=seed, alpha=alpha)


def _per_net(name: str, values: ArrayLike) -> np.ndarray:
    data = np.asarray(values, dtype=float)
    if data.ndim != 1 or len(data) == 0:
        raise DataError(f"{name}: expected one value per test net, got shape {data.shape}")
    if not np.all(np.isfinite(data)):
        raise DataError(f"{name}: not every value is a finite number")
    return data


def format_pvalue(pvalue: float) -> str:
    if not math.isfinite(pvalue):
        return "-"
    return f"{pvalue:.1e}" if pvalue < 1e-3 else f"{pvalue:.3f}"
