"""The statistics of issue 14 against hand-computed values, and their behaviour under the null.

No TensorFlow, no MLflow: these are numbers only. Expected values come from closed formulas
written out here, never from the function under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from nws.errors import DataError, ParameterError
from nws.meta.results_table import format_statistics_table
from nws.meta.statistics import (
    NOT_SIGNIFICANT,
    accuracy_statistics,
    bootstrap_mean_ci,
    count_statistics,
    mae_statistics,
    per_net_statistics,
    sign_flip_pvalue,
    verdict,
)

Z = 1.959963984540054  # the standard normal's 97.5 % quantile: a two-sided 95 % interval


@pytest.fixture(scope="session", autouse=True)
def _tensorflow() -> None:
    """Overrides the suite's TensorFlow set-up: these tests import neither TensorFlow nor Keras."""


def wilson(k: int, n: int) -> tuple[float, float]:
    """Wilson score interval, written out: (p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)."""
    p = k / n
    centre = (p + Z**2 / (2 * n)) / (1 + Z**2 / n)
    half = Z / (1 + Z**2 / n) * math.sqrt(p * (1 - p) / n + Z**2 / (4 * n**2))
    return centre - half, centre + half


def test_nine_of_ten_nets_at_chance_one_quarter_match_the_hand_computed_interval_and_pvalue():
    stats = count_statistics(9, 10, 0.25)
    # P(X >= 9 | n=10, p=1/4) = C(10,9)·(1/4)^9·(3/4) + (1/4)^10 = (30 + 1) / 4^10 = 2.9564e-05
    assert stats.pvalue == pytest.approx(31 / 4**10, rel=1e-12)
    assert f"{stats.pvalue:.4e}" == "2.9564e-05"
    # Wilson with p̂ = 0.9, n = 10, z = 1.96: centre 0.788989, half-width 0.193139
    assert (round(stats.ci_low, 4), round(stats.ci_high, 4)) == (0.5958, 0.9821)
    assert (stats.ci_low, stats.ci_high) == pytest.approx(wilson(9, 10), abs=1e-10)
    assert (stats.n, stats.estimate, stats.baseline) == (10, 0.9, 0.25)
    assert stats.significant and stats.verdict == "learned (p<0.01)"


def test_exact_clopper_pearson_interval_on_request():
    stats = count_statistics(9, 10, 0.25, interval="clopper-pearson")
    # Upper bound: P(X >= 10 | p) = p^10 = 0.975, so p = 0.975^(1/10) = 0.99747.
    assert stats.ci_high == pytest.approx(0.975**0.1, abs=1e-9)
    # Lower bound: P(X >= 9 | p) = 10 p^9 (1-p) + p^10 = 10 p^9 - 9 p^10 = 0.025, at p = 0.55498.
    low = stats.ci_low
    assert 10 * low**9 - 9 * low**10 == pytest.approx(0.025, abs=1e-9)
    assert round(low, 4) == 0.5550
    assert stats.pvalue == pytest.approx(31 / 4**10, rel=1e-12)  # the test does not change


def test_edge_cases_all_right_none_right_and_a_single_net():
    # k = n: the interval is [n / (n + z²), 1]; p = (1/4)^10.
    full = count_statistics(10, 10, 0.25)
    assert full.ci_high == pytest.approx(1.0, abs=1e-12)
    assert full.ci_low == pytest.approx(10 / (10 + Z**2), abs=1e-10)  # 0.72247
    assert full.pvalue == pytest.approx(0.25**10, rel=1e-12)
    # k = 0: the interval is [0, z² / (n + z²)]; P(X >= 0) = 1.
    none = count_statistics(0, 10, 0.25)
    assert none.ci_low == pytest.approx(0.0, abs=1e-12)
    assert none.ci_high == pytest.approx(Z**2 / (10 + Z**2), abs=1e-10)  # 0.27753
    assert none.pvalue == pytest.approx(1.0)
    assert none.verdict == NOT_SIGNIFICANT
    # One net, right, chance 1/2: p = 1/2, nothing can be concluded from one net.
    one = count_statistics(1, 1, 0.5)
    assert one.pvalue == pytest.approx(0.5)
    assert one.ci_low == pytest.approx(1 / (1 + Z**2), abs=1e-10)  # 0.20657
    assert not one.significant


def test_a_real_effect_is_significant():
    stats = accuracy_statistics(np.array([True] * 18 + [False] * 2), 0.25)
    # P(X >= 18 | n=20, p=1/4) = (C(20,18)·3² + C(20,19)·3 + 1) / 4^20 = 1771 / 4^20 = 1.6107e-09
    assert stats.pvalue == pytest.approx(1771 / 4**20, rel=1e-9)
    assert stats.pvalue < 0.01 and stats.verdict == "learned (p<0.01)"


def test_predictions_independent_of_the_labels_are_not_significant():
    """A model trained on shuffled labels: 20 test nets, 4 balanced classes, predictions drawn
    independently of the truth. The one-sided test must stay quiet in at least 95 of 100 seeds."""
    quiet = 0
    for seed in range(100):
        rng = np.random.default_rng(seed)
        truth = rng.permutation(np.repeat(np.arange(4), 5))
        prediction = rng.integers(0, 4, size=20)
        quiet += accuracy_statistics(prediction == truth, 0.25).pvalue > 0.01
    assert quiet >= 95


def test_learning_rate_statistics_match_a_hand_computed_sign_flip_test():
    # Truth 0 for 4 nets, constant guess 4: constant errors 4, 4, 4, 4; model errors 1, 2, 3, 4.5.
    # d = (3, 2, 1, -0.5), observed sum 5.5. Of the 2^4 = 16 sign patterns of |d| = (3, 2, 1, 0.5),
    # the sums reaching 5.5 are 6.5 (all +) and 5.5 (only 0.5 flipped): p = 2/16 = 0.125.
    truth = np.zeros(4)
    stats = mae_statistics(truth, np.array([1.0, -2.0, 3.0, 4.5]), 4.0)
    assert stats.pvalue == pytest.approx(2 / 16)
    assert stats.estimate == pytest.approx(10.5 / 4)
    assert stats.baseline == pytest.approx(4.0)
    assert stats.ci_low <= stats.estimate <= stats.ci_high
    assert stats.ci_low >= 1.0 and stats.ci_high <= 4.5  # a mean of resampled errors
    assert stats.verdict == NOT_SIGNIFICANT
    assert sign_flip_pvalue(np.zeros(5)) == 1.0  # no difference at all


def test_bootstrap_interval_is_seeded_and_agrees_with_the_normal_approximation_for_many_nets():
    errors = np.random.default_rng(3).exponential(1.0, size=400)
    low, high = bootstrap_mean_ci(errors, seed=7)
    assert (low, high) == bootstrap_mean_ci(errors, seed=7)
    half = Z * errors.std(ddof=1) / math.sqrt(len(errors))  # about 0.1 here
    assert low == pytest.approx(errors.mean() - half, abs=0.15 * half)
    assert high == pytest.approx(errors.mean() + half, abs=0.15 * half)
    assert bootstrap_mean_ci([0.3]) == (0.3, 0.3)  # one net: no spread to resample


def test_learning_rate_model_whose_error_ignores_the_truth_is_not_significant():
    """H0 at its hardest: the model's absolute error has the constant guess's distribution but
    is drawn independently of the net's true rate. At least 95 of 100 seeds stay quiet."""
    quiet = 0
    for seed in range(100):
        rng = np.random.default_rng(seed)
        truth = rng.uniform(0.0002, 0.005, size=20)
        guess = 0.0026
        error = np.abs(guess - rng.uniform(0.0002, 0.005, size=20))
        prediction = truth + rng.choice([-1.0, 1.0], size=20) * error
        quiet += mae_statistics(truth, prediction, guess, seed=seed, resamples=2000).pvalue > 0.01
    assert quiet >= 95


def test_learning_rate_model_close_to_the_truth_is_significant():
    rng = np.random.default_rng(0)
    truth = rng.uniform(0.0002, 0.005, size=20)
    stats = mae_statistics(truth, truth + rng.normal(0, 0.0002, size=20), float(np.median(truth)))
    assert stats.pvalue < 0.01 and stats.significant
    assert stats.ci_high < stats.baseline
    assert stats.parent_metrics("lrate", "dmc") == {
        "netmae_lrate_dmc": stats.estimate,
        "ci_low_lrate_dmc": stats.ci_low,
        "ci_high_lrate_dmc": stats.ci_high,
        "pvalue_lrate_dmc": stats.pvalue,
        "n_test_nets_lrate": 20.0,
    }


def test_metric_names_rows_and_table():
    stats = count_statistics(9, 10, 0.25)
    assert stats.parent_metrics("batch_size", "stats") == {
        "netacc_batch_size_stats": 0.9,
        "ci_low_batch_size_stats": stats.ci_low,
        "ci_high_batch_size_stats": stats.ci_high,
        "pvalue_batch_size_stats": stats.pvalue,
        "n_test_nets_batch_size": 10.0,
    }
    assert stats.run_metrics() == {
        "ci_low": stats.ci_low,
        "ci_high": stats.ci_high,
        "pvalue": stats.pvalue,
        "n_test_nets": 10.0,
    }
    lrate = mae_statistics(np.zeros(4), np.array([1.0, -2.0, 3.0, 4.5]), 4.0)
    rows = [
        {"property": "batch_size", "model": "stats", **stats.row()},
        {"property": "optimizer", "model": "dmc", **count_statistics(2, 6, 1 / 3).row()},
        {"property": "lrate", "model": "dmc", **lrate.row()},
    ]
    lines = format_statistics_table(rows).splitlines()
    assert len(lines) == 4
    assert "10" in lines[1] and "0.900 [0.596, 0.982]" in lines[1] and "0.250" in lines[1]
    assert "3.0e-05" in lines[1] and lines[1].endswith("* learned (p<0.01)")
    assert lines[2].endswith("not significant") and "*" not in lines[2]
    assert "L" not in lines[0].split()  # one slice length: no column for it
    swept = [{**rows[0], "slice_length": length} for length in (500, 5000)]
    swept.append({**rows[2], "slice_length": None})  # a whole-snapshot model's row
    lines = format_statistics_table(swept).splitlines()
    assert lines[0].split()[2] == "L" and [line.split()[2] for line in lines[1:]] == ["500", "5000", "-"]
    assert "MAE 2.62500" in lines[3] and "MAE 4.00000" in lines[3] and "0.125" in lines[3]
    assert lines[3].endswith("not significant")


def test_per_net_table_of_an_evaluation():
    per_net = {
        "net": np.arange(5),
        "true_value": np.array(["adam", "sgd", "sgd", "rmsprop", "adam"], dtype=object),
        "predicted_value": np.array(["adam", "sgd", "adam", "rmsprop", "adam"], dtype=object),
    }
    stats = per_net_statistics(per_net, chance=1 / 3)
    assert (stats.n, stats.estimate) == (5, 0.8)
    # P(X >= 4 | n=5, p=1/3) = (5·2 + 1) / 3^5 = 11/243
    assert stats.pvalue == pytest.approx(11 / 243)
    with pytest.raises(ParameterError, match="chance"):
        per_net_statistics(per_net)


def test_bad_input_is_a_clear_error():
    with pytest.raises(DataError, match="test nets"):
        count_statistics(0, 0, 0.25)
    with pytest.raises(DataError, match="test nets"):
        count_statistics(11, 10, 0.25)
    with pytest.raises(ParameterError, match=r"^chance: "):
        count_statistics(5, 10, 1.0)
    with pytest.raises(ParameterError, match=r"^interval: "):
        count_statistics(5, 10, 0.25, interval="normal")
    with pytest.raises(DataError, match="prediction"):
        mae_statistics(np.zeros(3), np.array([0.0, np.nan, 1.0]), 0.5)
    with pytest.raises(DataError, match="3 true values but 2 predictions"):
        mae_statistics(np.zeros(3), np.zeros(2), 0.5)
    assert verdict(float("nan")) == NOT_SIGNIFICANT
    assert verdict(0.001, alpha=0.05) == "learned (p<0.05)"
