"""The dissection's Markdown summary: one line per property with its best model, the verdict,
the score with its interval, and a few words on when, where and how much, from the same tables
and the same choice of best model as the figure (`nws.meta.dissection`)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from nws.meta.dissection import (
    ACCURACY,
    ACCURACY_COLUMN,
    MAE,
    MAE_COLUMN,
    WhereCurve,
    best_models,
    finite,
    with_best,
)
from nws.meta.statistics import ALPHA, format_pvalue, verdict


def dissection_markdown(
    results: pd.DataFrame,
    when: pd.DataFrame | None = None,
    where: Mapping[str, WhereCurve] | None = None,
    how_much: pd.DataFrame | None = None,
    best: Mapping[str, str] | None = None,
    alpha: float = ALPHA,
) -> str:
    """One line per property: its best model, the verdict, the score with its interval against
    chance (or the constant guess), the p-value, and a few words on when, where and how much."""
    chosen = best_models(results)
    for prop, name in (best or {}).items():
        if ((results["property"] == prop) & (results["model"] == name)).any():
            chosen[prop] = name
    when_rows, how_rows, curves = with_best(when, chosen), with_best(how_much, chosen), dict(where or {})
    lines = [
        "# How much, where and when each property is encoded",
        "",
        "Every number counts test nets (slices of one net are not independent). Classification: "
        "per-net accuracy with a 95 % Wilson interval and a one-sided exact binomial test against "
        "chance. Learning rate: per-net MAE with a 95 % percentile-bootstrap interval (resampling "
        "nets) and a one-sided paired sign-flip permutation test against the constant guess. "
        f"A property is called learned only if p < {alpha:g}; p-values are not adjusted for the "
        "number of properties and models, nor for picking the best model on the test nets.",
        "",
        "| property | best model | verdict | per-net score [95 % CI] | chance / constant guess "
        "| p-value | test nets | when | where | how much |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for prop, rows in results.groupby("property", sort=False):
        row = rows[rows["model"] == chosen[prop]].iloc[0]
        pvalue = float(row["pvalue"])
        if finite([row.get(ACCURACY_COLUMN)]).all():
            measure = ACCURACY
            score = f"accuracy {row[ACCURACY_COLUMN]:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}]"
            base = f"{row['chance']:.3f}"
        else:
            measure = MAE
            score = f"MAE {row[MAE_COLUMN]:.5f} [{row['ci_low']:.5f}, {row['ci_high']:.5f}]"
            base = f"MAE {row['constant_guess_mae']:.5f}"
        cells = [
            str(prop),
            str(row["model"]),
            verdict(pvalue, alpha),
            score,
            base,
            format_pvalue(pvalue),
            str(int(row["n_test_nets"])),
            _when_words(when_rows, str(prop), measure, chosen[prop]),
            _where_words(curves.get(str(prop)), measure, chosen[prop]),
            _how_much_words(how_rows, str(prop), measure, chosen[prop]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _value(measure: str, value: float) -> str:
    return f"{value:.3f}" if measure == ACCURACY else f"{value:.5f}"


def _extreme(measure: str) -> str:
    return "peak" if measure == ACCURACY else "lowest"


def _by(used: str, best: str) -> str:
    """Name the model a finding comes from when it is not the property's best model."""
    return f"{used}: " if used and used != best else ""


def _model_of(rows: pd.DataFrame) -> str:
    return str(rows["model"].iloc[0]) if "model" in rows else ""


def _when_words(table: pd.DataFrame, prop: str, measure: str, best: str) -> str:
    rows = table[table["property"] == prop].sort_values("k") if not table.empty else table
    if rows.empty:
        return "no per-snapshot results"
    values = rows[measure].to_numpy(dtype=float)
    at = int(np.argmax(values) if measure == ACCURACY else np.argmin(values))
    by = _by(_model_of(rows), best)
    words = f"{by}{_extreme(measure)} {_value(measure, values[at])} at k={rows['k'].iloc[at]}"
    if "baseline" in rows and len(rows) > 1:
        if measure == ACCURACY:
            clear = rows[rows["ci_low"] > rows["baseline"]]
            side = "above chance"
        else:
            clear = rows[rows["ci_high"] < rows["baseline"]]
            side = "below the constant guess"
        words += (
            f"; 95 % CI first wholly {side} at k={clear['k'].iloc[0]}"
            if len(clear)
            else f"; 95 % CI never wholly {side}"
        )
    return words


def _where_words(sweep: WhereCurve | None, measure: str, best: str) -> str:
    if sweep is None or not len(sweep.curve):
        return "no position sweep"
    curve = np.asarray(sweep.curve, dtype=float)
    positions = np.linspace(0, 1, len(curve))
    if sweep.boundary is not None and 0 < sweep.boundary < 1:
        conv = curve[positions < sweep.boundary].mean()
        fc = curve[positions >= sweep.boundary].mean()
        by = _by(sweep.model, best)
        return f"{by}slices starting in conv {_value(measure, conv)}, in fc {_value(measure, fc)}"
    at = int(np.argmax(curve) if measure == ACCURACY else np.argmin(curve))
    within = "" if sweep.region == "all" else f"within {sweep.region}: "
    extreme = f"{_extreme(measure)} {_value(measure, curve[at])} at {positions[at]:.2f}"
    return f"{_by(sweep.model, best)}{within}{extreme}"


def _how_much_words(table: pd.DataFrame, prop: str, measure: str, best: str) -> str:
    rows = table[table["property"] == prop].sort_values("slice_length") if not table.empty else table
    if rows.empty:
        return "no results per slice length"
    first, last = rows.iloc[0], rows.iloc[-1]
    by = _by(_model_of(rows), best)
    if len(rows) == 1:
        return f"{by}L={int(first['slice_length'])} only"
    return (
        f"{by}{_value(measure, first[measure])} at L={int(first['slice_length'])}, "
        f"{_value(measure, last[measure])} at L={int(last['slice_length'])}"
    )
