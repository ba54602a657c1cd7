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

Why one module: the figure and its Markdown summary answer the same three questions from the
same tables, with the same choice of best model and of measure per property; kept together, the
words cannot drift from the panels they describe.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

from nws.errors import DataError
from nws.meta.statistics import (
    ALPHA,
    CONFIDENCE,
    bootstrap_mean_ci,
    count_statistics,
    format_pvalue,
    verdict,
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


def best_models(results: pd.DataFrame) -> dict[str, str]:
    """Per property, the model with the best per-net score (highest accuracy or lowest MAE; a
    tie goes to the smaller p-value). The best of several models is chosen on the test nets, so
    its p-value is that of a selected model, not of a model fixed in advance."""
    best: dict[str, str] = {}
    for prop, rows in results.groupby("property", sort=False):
        if _finite(rows.get(ACCURACY_COLUMN)).any():
            order = rows.assign(_score=-rows[ACCURACY_COLUMN])
        else:
            order = rows.assign(_score=rows[MAE_COLUMN])
        order = order.assign(_p=order.get("pvalue", 0.0))
        best[str(prop)] = str(order.sort_values(["_score", "_p"], kind="stable").iloc[0]["model"])
    return best


def _finite(column: Any) -> np.ndarray:
    if column is None:
        return np.array([], dtype=bool)
    return np.isfinite(pd.to_numeric(pd.Series(column), errors="coerce").to_numpy(dtype=float))


def _measure(rows: pd.DataFrame) -> str:
    """A property's rows hold an accuracy, or (the learning rate) an MAE."""
    if ACCURACY in rows and _finite(rows[ACCURACY]).any():
        return ACCURACY
    if MAE in rows and _finite(rows[MAE]).any():
        return MAE
    raise DataError(f"property {rows['property'].iloc[0]}: rows have neither an accuracy nor an mae value")


def _with_best(table: pd.DataFrame | None, best: Mapping[str, str] | None) -> pd.DataFrame:
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
            measure = _measure(rows)
            means = rows.groupby("model")[measure].mean()
            name = means.idxmax() if measure == ACCURACY else means.idxmin()
        kept.append(rows[rows["model"] == name])
    return pd.concat(kept, ignore_index=True)


def _properties(when: pd.DataFrame, where: Mapping[str, WhereCurve], how_much: pd.DataFrame) -> list[str]:
    names: list[str] = []
    for table in (when, how_much):
        if not table.empty:
            names += list(table["property"])
    names += list(where)
    return list(dict.fromkeys(names))


def _measures(when: pd.DataFrame, where: Mapping[str, WhereCurve], how_much: pd.DataFrame) -> dict[str, str]:
    measures = {name: curve.measure for name, curve in where.items()}
    for table in (when, how_much):
        if not table.empty:
            for prop, rows in table.groupby("property", sort=False):
                measures[str(prop)] = _measure(rows)
    return measures


def dissection_png(
    when: pd.DataFrame | None,
    where: Mapping[str, WhereCurve] | None,
    how_much: pd.DataFrame | None,
    best: Mapping[str, str] | None = None,
    title: str = "How much, where and when each property is encoded",
) -> bytes:
    """The three panels (when, where, how much) in one PNG; one row per measure present
    (accuracy, then the learning rate's MAE)."""
    plt = _pyplot()
    fig = dissection_figure(when, where, how_much, best, title)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    return buffer.getvalue()


def dissection_figure(
    when: pd.DataFrame | None,
    where: Mapping[str, WhereCurve] | None,
    how_much: pd.DataFrame | None,
    best: Mapping[str, str] | None = None,
    title: str = "How much, where and when each property is encoded",
) -> Any:
    """The matplotlib figure behind `dissection_png` (the caller closes it)."""
    when_rows, how_rows, curves = _with_best(when, best), _with_best(how_much, best), dict(where or {})
    props = _properties(when_rows, curves, how_rows)
    measures = _measures(when_rows, curves, how_rows)
    rows = [m for m in (ACCURACY, MAE) if m in measures.values()] or [ACCURACY]
    colours = _colours(props)
    plt = _pyplot()
    fig, axes = plt.subplots(len(rows), 3, figsize=(17, 4.3 * len(rows)), squeeze=False)
    for r, measure in enumerate(rows):
        chosen = [p for p in props if measures.get(p) == measure]
        ylabel = "per-net accuracy" if measure == ACCURACY else "per-net MAE"
        _when_panel(axes[r][0], when_rows, chosen, measure, colours, ylabel)
        _where_panel(axes[r][1], curves, chosen, measure, colours)
        _how_much_panel(axes[r][2], how_rows, chosen, measure, colours, ylabel)
        handles = [
            plt.Line2D([], [], color=colours[p], marker="o", label=_label(p, when_rows, curves, how_rows))
            for p in chosen
        ]
        if handles:
            baseline = "chance" if measure == ACCURACY else "constant guess"
            handles.append(plt.Line2D([], [], color="grey", linestyle="--", label=f"{baseline} (dashed)"))
            axes[r][2].legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small",
                              title="property (model)", title_fontsize="small")  # fmt: skip
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colours(props: list[str]) -> dict[str, Any]:
    import matplotlib

    palette = matplotlib.colormaps["tab10" if len(props) <= 10 else "tab20"]
    return {p: palette(i % palette.N) for i, p in enumerate(props)}


def _label(prop: str, when: pd.DataFrame, curves: Mapping[str, WhereCurve], how_much: pd.DataFrame) -> str:
    """'prop (model)', or which model each panel shows when they differ (a sweep only exists for
    slice models, so the best model's sweep may be missing)."""
    used = {}
    for panel, table in (("when", when), ("how much", how_much)):
        if not table.empty and "model" in table and (table["property"] == prop).any():
            used[panel] = str(table.loc[table["property"] == prop, "model"].iloc[0])
    if prop in curves and curves[prop].model:
        used["where"] = curves[prop].model
    models = list(dict.fromkeys(used.values()))
    if len(models) <= 1:
        return f"{prop} ({models[0]})" if models else prop
    parts = [f"{m}: {', '.join(p for p in PANELS if used.get(p) == m)}" for m in models]
    return f"{prop} ({'; '.join(parts)})"


def _empty(ax: Any, panel: str, measure: str) -> None:
    ax.text(0.5, 0.5, MISSING[panel], ha="center", va="center", transform=ax.transAxes, color="dimgrey")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(_title(panel, measure))


def _title(panel: str, measure: str) -> str:
    what = "accuracy" if measure == ACCURACY else "MAE"
    return {
        "when": f"when: {what} by snapshot k (95 % CI)",
        "where": f"where: {what} by slice start",
        "how much": f"how much: {what} by slice length (95 % CI)",
    }[panel]


def _baseline_line(ax: Any, value: Any, colour: Any) -> None:
    if value is not None and np.isfinite(value):
        ax.axhline(float(value), color=colour, linestyle="--", linewidth=0.8, alpha=0.7)


def _errorbars(ax: Any, x: Any, part: pd.DataFrame, measure: str, colour: Any, fmt: str) -> None:
    value = part[measure].to_numpy(dtype=float)
    below = value - part["ci_low"].to_numpy(dtype=float)
    above = part["ci_high"].to_numpy(dtype=float) - value
    ax.errorbar(x, value, yerr=[below, above], fmt=fmt, color=colour, markersize=3, capsize=3)


def _dodge(count: int) -> np.ndarray:
    """Offsets (-1..1) that keep the intervals of several properties at one x apart."""
    return np.linspace(-1, 1, count) if count > 1 else np.zeros(1)


def _when_panel(
    ax: Any, table: pd.DataFrame, props: list[str], measure: str, colours: Any, ylabel: str
) -> None:
    from matplotlib.ticker import MaxNLocator

    rows = table[table["property"].isin(props)] if not table.empty else table
    if rows.empty:
        _empty(ax, "when", measure)
        return
    ks = sorted(rows["k"].unique())
    groups = list(rows.groupby("property", sort=False))
    for (prop, part), offset in zip(groups, _dodge(len(groups)), strict=True):
        part = part.sort_values("k")
        colour = colours[prop]
        if len(ks) == 1:
            _errorbars(ax, part["k"] + 0.2 * offset, part, measure, colour, "o")
        else:
            ax.plot(part["k"], part[measure], "o-", color=colour, markersize=3)
            ax.fill_between(part["k"], part["ci_low"], part["ci_high"], color=colour, alpha=0.15)
        if "baseline" in part:
            _baseline_line(ax, part["baseline"].iloc[0], colour)
    if len(ks) == 1:
        ax.set_xlim(ks[0] - 1, ks[0] + 1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("snapshot k (1 = initialisation)")
    ax.set_ylabel(ylabel)
    _finish(
        ax, "when", measure, f"one snapshot only (k = {ks[0]}): a K range shows when" if len(ks) == 1 else ""
    )


def _where_panel(
    ax: Any, curves: Mapping[str, WhereCurve], props: list[str], measure: str, colours: Any
) -> None:
    chosen = [p for p in props if p in curves and len(curves[p].curve)]
    if not chosen:
        _empty(ax, "where", measure)
        return
    boundaries = {}
    for prop in chosen:
        sweep = curves[prop]
        ax.plot(np.linspace(0, 1, len(sweep.curve)), sweep.curve, "-", color=colours[prop], linewidth=1.2)
        _baseline_line(ax, sweep.baseline, colours[prop])
        if sweep.boundary is not None:
            boundaries[prop] = round(float(sweep.boundary), 2)
    note = ""
    if len(set(boundaries.values())) == 1:
        ax.axvline(next(iter(boundaries.values())), color="red", linestyle=":", label="conv | fc")
        ax.legend(loc="lower right", fontsize="small")
    else:
        for prop, boundary in boundaries.items():
            ax.axvline(boundary, color=colours[prop], linestyle=":")
        note = (
            "dotted: each property's conv | fc boundary"
            if boundaries
            else "no conv | fc boundary (one region)"
        )
    ax.set_xlabel("relative slice start within the region (0 = start, 1 = end)")
    _finish(ax, "where", measure, note)


def _how_much_panel(
    ax: Any, table: pd.DataFrame, props: list[str], measure: str, colours: Any, ylabel: str
) -> None:
    rows = table[table["property"].isin(props)] if not table.empty else table
    if rows.empty:
        _empty(ax, "how much", measure)
        return
    lengths = sorted(rows["slice_length"].unique())
    groups = list(rows.groupby("property", sort=False))
    for (prop, part), offset in zip(groups, _dodge(len(groups)), strict=True):
        part = part.sort_values("slice_length")
        if len(lengths) == 1:
            _errorbars(ax, part["slice_length"] * (1 + 0.05 * offset), part, measure, colours[prop], "o")
        else:
            _errorbars(ax, part["slice_length"], part, measure, colours[prop], "o-")
        if "baseline" in part:
            _baseline_line(ax, part["baseline"].iloc[0], colours[prop])
    note = ""
    if len(lengths) == 1:
        ax.set_xlim(0.85 * lengths[0], 1.15 * lengths[0])
        ax.set_xticks([lengths[0]])
        note = f"one slice length only (L = {int(lengths[0])}): train others to see how much"
    elif lengths[-1] / max(lengths[0], 1) >= 10:
        ax.set_xscale("log")
    ax.set_xlabel("slice length L (consecutive weights)")
    ax.set_ylabel(ylabel)
    _finish(ax, "how much", measure, note)


def _finish(ax: Any, panel: str, measure: str, note: str = "") -> None:
    """Common axes, and the panel's title; a note on missing data goes under the title, where it
    cannot hide a point."""
    if measure == ACCURACY:
        ax.set_ylim(0, 1.05)
    else:
        ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.4)
    ax.set_title(_title(panel, measure) + (f"\n{note}" if note else ""))


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
    when_rows, how_rows, curves = _with_best(when, chosen), _with_best(how_much, chosen), dict(where or {})
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
        if _finite([row.get(ACCURACY_COLUMN)]).all():
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
    return f"{_by(sweep.model, best)}{_extreme(measure)} {_value(measure, curve[at])} at {positions[at]:.2f}"


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
