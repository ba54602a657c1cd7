"""The dissection of issue 14: one figure and one Markdown summary of how much, where and when
each property is encoded in the weights (the three questions of the NWS paper).

- when: the per-net accuracy (or MAE) against the snapshot index k, with its 95 % interval, one
  line per property for the property's best model;
- where: the accuracy against the relative slice start within the region (the position sweep),
  with the conv/fc boundary and chance marked;
- how much: the accuracy against the slice length, one line per property.

Classification properties are drawn in accuracy (top row), the learning rate in MAE (bottom row,
against the constant guess), since the two share no scale. A panel without data says so.

Inputs are plain tables, so the figure can be drawn from one campaign or from several (e.g. one
per slice length) without training anything:

- `when`: columns property, model, k, n_nets, accuracy (or mae), ci_low, ci_high and optionally
  baseline (chance, or the constant guess's MAE); `snapshot_rows` / `snapshot_mae_rows` build it;
- `where`: per property a `WhereCurve` (e.g. `evaluation.sweep_accuracy` of its best model);
- `how_much`: columns property, slice_length, accuracy (or mae), ci_low, ci_high and optionally
  model and baseline;
- `results` (Markdown only): the results table with the `NetStatistics.row` columns.

The figure: `nws.meta.dissection_figure`; the Markdown summary: `nws.meta.dissection_markdown`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

from nws.errors import DataError
from nws.meta.statistics import (
    CONFIDENCE,
    bootstrap_mean_ci,
    count_statistics,
)

ACCURACY, MAE = "accuracy", "mae"
ACCURACY_COLUMN, MAE_COLUMN = "net_accuracy", "net_mae"  # the results table's per-net scores
PANELS = ("when", "where", "how much")
MISSING = {
    "when": "no per-snapshot results",
    "where": "no position sweep\n(sweep off, or whole-snapshot models only)",
    "how much": "no results per slice length",
}


@dataclass(frozen=True)
class WhereCurve:
    """A property's position sweep: its score per relative slice start (0 = the region's start,
    1 = its end), where the conv part ends (a fraction of the region, None unless region = all),
    and chance (or the constant guess's MAE; NaN when unknown)."""

    curve: np.ndarray
    boundary: float | None = None
    baseline: float = float("nan")
    model: str = ""
    measure: str = ACCURACY
    region: str = "all"  # the region the slices were cut from (`region=auto` chooses per property)


def snapshot_rows(
    prop: str, model: str, by_snapshot: Mapping[int, float], n_nets: int, chance: float
) -> pd.DataFrame:
    """`when` rows from an `Evaluation.by_snapshot` of a classification: at every k each test net
    has one snapshot, so the accuracy is a count over the n test nets and gets a Wilson interval."""
    rows = []
    for k, accuracy in sorted(by_snapshot.items()):
        correct = round(accuracy * n_nets)
        if not math.isclose(correct, accuracy * n_nets, abs_tol=1e-6):
            raise DataError(f"by_snapshot: accuracy {accuracy} at k={k} is not a count of {n_nets} nets")
        stats = count_statistics(correct, n_nets, chance)
        rows.append({"property": prop, "model": model, "k": int(k), "n_nets": n_nets, ACCURACY: accuracy,
                     "ci_low": stats.ci_low, "ci_high": stats.ci_high, "baseline": chance})  # fmt: skip
    return pd.DataFrame(rows)


def snapshot_mae_rows(
    prop: str,
    model: str,
    errors_by_k: Mapping[int, ArrayLike],
    constant_mae: float,
    *,
    seed: int = 0,
    confidence: float = CONFIDENCE,
) -> pd.DataFrame:
    """`when` rows of a regression: per k, the absolute errors of the test nets' snapshots at k,
    their mean and its percentile-bootstrap interval (resampling nets)."""
    rows = []
    for k, errors in sorted(errors_by_k.items()):
        values = np.abs(np.asarray(errors, dtype=float))
        low, high = bootstrap_mean_ci(values, confidence=confidence, seed=seed)
        rows.append({"property": prop, "model": model, "k": int(k), "n_nets": len(values),
                     MAE: float(values.mean()), "ci_low": low, "ci_high": high,
                     "baseline": constant_mae})  # fmt: skip
    return pd.DataFrame(rows)


def when_rows(
    prop: str, model: str, per_snapshot: pd.DataFrame, baseline: float, *, seed: int = 0
) -> pd.DataFrame:
    """`when` rows from an `Evaluation.per_snapshot` table (one row per test snapshot: net, k, and
    snapshot_correct, or abs_error for the learning rate): per k, a count over the test nets with
    its Wilson interval, or their mean absolute error with its bootstrap interval."""
    if "snapshot_correct" not in per_snapshot:
        errors = {int(k): part.to_numpy() for k, part in per_snapshot.groupby("k")["abs_error"]}
        return snapshot_mae_rows(prop, model, errors, baseline, seed=seed)
    rows = []
    for k, hits in per_snapshot.groupby("k")["snapshot_correct"]:
        stats = count_statistics(int(hits.sum()), len(hits), baseline)
        rows.append({"property": prop, "model": model, "k": int(k), "n_nets": len(hits),
                     ACCURACY: stats.estimate, "ci_low": stats.ci_low, "ci_high": stats.ci_high,
                     "baseline": baseline})  # fmt: skip
    return pd.DataFrame(rows)


def how_much_rows(results: pd.DataFrame) -> pd.DataFrame:
    """`how_much` rows from the results table's rows that have a slice length (whole-snapshot
    models have none): each row's per-net score, its interval and its baseline."""
    if results.empty or "slice_length" not in results:
        return pd.DataFrame()
    rows = []
    for row in results[finite(results["slice_length"])].to_dict("records"):
        accuracy = finite([row.get(ACCURACY_COLUMN)]).all()
        measure, column, base = (
            (ACCURACY, ACCURACY_COLUMN, "chance") if accuracy else (MAE, MAE_COLUMN, "constant_guess_mae")
        )
        rows.append({"property": row["property"], "model": row["model"],
                     "slice_length": int(row["slice_length"]), measure: row[column],
                     "ci_low": row["ci_low"], "ci_high": row["ci_high"], "baseline": row[base]})  # fmt: skip
    return pd.DataFrame(rows)


def best_models(results: pd.DataFrame) -> dict[str, str]:
    """Per property, the model with the best per-net score (highest accuracy or lowest MAE; a
    tie goes to the smaller p-value). The best of several models is chosen on the test nets, so
    its p-value is that of a selected model, not of a model fixed in advance."""
    best: dict[str, str] = {}
    for prop, rows in results.groupby("property", sort=False):
        if finite(rows.get(ACCURACY_COLUMN)).any():
            order = rows.assign(_score=-rows[ACCURACY_COLUMN])
        else:
            order = rows.assign(_score=rows[MAE_COLUMN])
        order = order.assign(_p=order.get("pvalue", 0.0))
        best[str(prop)] = str(order.sort_values(["_score", "_p"], kind="stable").iloc[0]["model"])
    return best


def finite(column: Any) -> np.ndarray:
    if column is None:
        return np.array([], dtype=bool)
    return np.isfinite(pd.to_numeric(pd.Series(column), errors="coerce").to_numpy(dtype=float))


def measure_of(rows: pd.DataFrame) -> str:
    """A property's rows hold an accuracy, or (the learning rate) an MAE."""
    if ACCURACY in rows and finite(rows[ACCURACY]).any():
        return ACCURACY
    if MAE in rows and finite(rows[MAE]).any():
        return MAE
    raise DataError(f"property {rows['property'].iloc[0]}: rows have neither an accuracy nor an mae value")


def with_best(table: pd.DataFrame | None, best: Mapping[str, str] | None) -> pd.DataFrame:
    """Keep the best model's rows of every property (by `best`, else by its mean score)."""
    if table is None or table.empty:
        return pd.DataFrame()
    if "model" not in table:
        return table
    kept = []
    for prop, rows in table.groupby("property", sort=False):
        if best and prop in best and (rows["model"] == best[prop]).any():
            name = best[prop]
        else:
            measure = measure_of(rows)
            means = rows.groupby("model")[measure].mean()
            name = means.idxmax() if measure == ACCURACY else means.idxmin()
        kept.append(rows[rows["model"] == name])
    return pd.concat(kept, ignore_index=True)
