"""The dissection's figure: three panels (when, where, how much), one row per measure present
(accuracy, then the learning rate's MAE), drawn from the plain tables of `nws.meta.dissection`.
A panel without data says so."""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from nws.meta.dissection import ACCURACY, MAE, MISSING, PANELS, WhereCurve, measure_of, with_best


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
                measures[str(prop)] = measure_of(rows)
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
    when_rows, how_rows, curves = with_best(when, best), with_best(how_much, best), dict(where or {})
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
        region = curves[prop].region
        used["where"] = curves[prop].model + ("" if region == "all" else f" in {region}")
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


def _by_property(
    ax: Any, table: pd.DataFrame, props: list[str], column: str, panel: str, measure: str
) -> tuple[list[tuple[str, pd.DataFrame, float]], list[float]]:
    """Each chosen property's rows, sorted by `column`, with its dodge offset, and the values of
    `column` drawn; with no rows the panel says so and both lists are empty."""
    rows = table[table["property"].isin(props)] if not table.empty else table
    if rows.empty:
        _empty(ax, panel, measure)
        return [], []
    groups = list(rows.groupby("property", sort=False))
    return [
        (prop, part.sort_values(column), offset)
        for (prop, part), offset in zip(groups, _dodge(len(groups)), strict=True)
    ], sorted(rows[column].unique())


def _when_panel(
    ax: Any, table: pd.DataFrame, props: list[str], measure: str, colours: Any, ylabel: str
) -> None:
    from matplotlib.ticker import MaxNLocator

    groups, ks = _by_property(ax, table, props, "k", "when", measure)
    if not groups:
        return
    for prop, part, offset in groups:
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
    groups, lengths = _by_property(ax, table, props, "slice_length", "how much", measure)
    if not groups:
        return
    for prop, part, offset in groups:
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
