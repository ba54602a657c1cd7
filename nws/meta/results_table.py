"""The results table as `train` and `main` print it: one line per (property, model), with the
statistics of `nws.meta.statistics` (interval, p-value, significance mark, verdict)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from nws.meta.statistics import NOT_SIGNIFICANT, format_pvalue, verdict


def format_statistics_table(table: Any) -> str:
    """The results as printed at the end: per (property, model) the number of test nets, the
    per-net accuracy (or MAE) with its 95 % interval, chance (or the constant guess's MAE), the
    one-sided p-value, a `*` where it is below `ALPHA`, and the verdict. `table`: a DataFrame or
    rows with the `NetStatistics.row` columns plus `property` and `model`; with rows of several
    slice lengths (a `slice_length` column), the length gets a column `L`."""
    rows: list[Mapping[str, Any]] = list(table.to_dict("records") if hasattr(table, "to_dict") else table)
    lengths = {row.get("slice_length") for row in rows if _is_number(row.get("slice_length"))}
    with_length = len(lengths) > 1
    length_header = f"{'L':>6} " if with_length else ""
    header = (
        f"{'property':<15} {'model':<12} {length_header}{'nets':>4}  {'per net [95 % CI]':<32} "
        f"{'chance / constant':<17} {'p-value':>8}    verdict"
    )
    lines = [header]
    for row in rows:
        if _is_number(row.get("net_mae")) and not _is_number(row.get("net_accuracy")):
            score = f"MAE {row['net_mae']:.5f} [{row['ci_low']:.5f}, {row['ci_high']:.5f}]"
            base = f"MAE {row['constant_guess_mae']:.5f}"
        else:
            score = f"acc {row['net_accuracy']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}]"
            base = f"{row['chance']:.3f}"
        pvalue = float(row["pvalue"])
        word = row.get("verdict") or verdict(pvalue)
        mark = "*" if word != NOT_SIGNIFICANT else " "
        length = f"{_length(row.get('slice_length')):>6} " if with_length else ""
        lines.append(
            f"{row['property']:<15} {row['model']:<12} {length}{int(row['n_test_nets']):>4}  {score:<32} "
            f"{base:<17} {format_pvalue(pvalue):>8}  {mark} {word}"
        )
    return "\n".join(lines)


def _length(value: Any) -> str:
    """A slice length, or '-' for a whole-snapshot model's row."""
    return str(int(value)) if _is_number(value) else "-"


def _is_number(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False
