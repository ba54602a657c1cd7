"""The dissection figure and its Markdown summary, drawn from plain tables (no training, no MLflow)."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest

from nws.meta.dissection import WhereCurve, best_models, snapshot_mae_rows, snapshot_rows
from nws.meta.dissection_figure import dissection_figure, dissection_png
from nws.meta.dissection_markdown import dissection_markdown
from nws.meta.statistics import count_statistics, mae_statistics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="session", autouse=True)
def _tensorflow() -> None:
    """Overrides the suite's TensorFlow set-up: these tests import neither TensorFlow nor Keras."""


def _results() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    truth = rng.uniform(0.0002, 0.005, size=12)
    rows = [
        {"property": "dataset", "model": "dmc", **count_statistics(11, 12, 0.2).row()},
        {"property": "dataset", "model": "stats", **count_statistics(8, 12, 0.2).row()},
        {"property": "optimizer", "model": "dmc", **count_statistics(5, 12, 1 / 3).row()},
        {"property": "optimizer", "model": "stats", **count_statistics(6, 12, 1 / 3).row()},
        {"property": "lrate", "model": "dmc",
         **mae_statistics(truth, truth + rng.normal(0, 2e-4, 12), float(np.median(truth))).row()},
    ]  # fmt: skip
    return pd.DataFrame(rows)


def _when() -> pd.DataFrame:
    parts = []
    for prop, model, chance, accuracies in (
        ("dataset", "dmc", 0.2, [0.25, 0.5, 0.75, 11 / 12]),
        ("dataset", "stats", 0.2, [0.25, 0.25, 0.5, 0.75]),
        ("optimizer", "stats", 1 / 3, [1 / 3, 5 / 12, 5 / 12, 0.5]),
    ):
        parts.append(snapshot_rows(prop, model, dict(zip([1, 2, 3, 4], accuracies, strict=True)), 12, chance))
    errors = {k: np.abs(np.random.default_rng(k).normal(0, 0.001 / k, 12)) for k in (1, 2, 3, 4)}
    parts.append(snapshot_mae_rows("lrate", "dmc", errors, 0.0012))
    return pd.concat(parts, ignore_index=True)


def _where() -> dict[str, WhereCurve]:
    positions = np.linspace(0, 1, 100)
    return {
        "dataset": WhereCurve(0.9 - 0.3 * positions, boundary=0.62, baseline=0.2, model="dmc"),
        "optimizer": WhereCurve(
            0.4 + 0.1 * np.sin(6 * positions), boundary=0.62, baseline=1 / 3, model="dmc"
        ),
        "lrate": WhereCurve(
            0.0008 + 0.0002 * positions, boundary=0.62, baseline=0.0012, model="dmc", measure="mae"
        ),
    }


def _how_much() -> pd.DataFrame:
    rows = []
    for prop, chance, accuracies in (("dataset", 0.2, [7, 9, 11]), ("optimizer", 1 / 3, [4, 5, 6])):
        for length, correct in zip((500, 5000, 50000), accuracies, strict=True):
            stats = count_statistics(correct, 12, chance)
            rows.append({"property": prop, "model": "dmc", "slice_length": length, "accuracy": stats.estimate,
                         "ci_low": stats.ci_low, "ci_high": stats.ci_high, "baseline": chance})  # fmt: skip
    return pd.DataFrame(rows)


def _image_size(png: bytes) -> tuple[int, int]:
    from PIL import Image

    return Image.open(io.BytesIO(png)).size


def test_snapshot_rows_count_nets_and_carry_wilson_intervals():
    rows = snapshot_rows("dataset", "dmc", {3: 0.75, 1: 0.25}, 12, 0.2)
    assert list(rows["k"]) == [1, 3]
    expected = count_statistics(9, 12, 0.2)
    assert rows.iloc[1][["ci_low", "ci_high"]].tolist() == pytest.approx([expected.ci_low, expected.ci_high])
    errors = snapshot_mae_rows("lrate", "dmc", {1: [0.001, -0.002, 0.003]}, 0.0012)
    assert errors.iloc[0]["mae"] == pytest.approx(0.002) and errors.iloc[0]["n_nets"] == 3
    low, high = errors.iloc[0][["ci_low", "ci_high"]]
    assert 0.001 - 1e-12 <= low <= 0.002 <= high <= 0.003 + 1e-12  # means of resampled errors


def test_best_model_per_property():
    assert best_models(_results()) == {"dataset": "dmc", "optimizer": "stats", "lrate": "dmc"}


def test_the_figure_draws_all_three_panels_for_both_measures():
    png = dissection_png(_when(), _where(), _how_much())
    assert png.startswith(PNG_MAGIC)
    words = _words(_when(), _where(), _how_much())
    assert len(words) == 6 and not any(" no " in w for w in words[:5])
    assert words[3].startswith("when: MAE") and words[5].endswith("no results per slice length")  # lrate
    assert len(png) > 40_000
    width, height = _image_size(png)
    assert width > 1000 and height > 500  # two rows: accuracy, then the learning rate's MAE


def _words(when, where, how_much) -> list[str]:
    """Every panel's title and text, one string per panel (when, where, how much; row by row)."""
    import matplotlib.pyplot as plt

    fig = dissection_figure(when, where, how_much)
    try:
        return [
            " ".join([ax.get_title(), *(t.get_text() for t in ax.texts)]) for ax in fig.axes if ax.get_title()
        ]
    finally:
        plt.close(fig)


def test_missing_panels_still_draw_and_say_so():
    only_when = _when()
    only_when = only_when[only_when["property"] != "lrate"]
    png = dissection_png(only_when, None, None)
    assert png.startswith(PNG_MAGIC) and len(png) > 15_000
    assert _image_size(png)[1] < 400  # one row: no learning rate anywhere
    when, where, how_much = _words(only_when, None, None)
    assert "no per-snapshot" not in when
    assert "no position sweep" in where and "no results per slice length" in how_much

    single_length = _how_much()[lambda t: t["slice_length"] == 5000]
    single_k = only_when[only_when["k"] == 4]
    png = dissection_png(single_k, {}, single_length)
    assert png.startswith(PNG_MAGIC) and len(png) > 15_000
    when, where, how_much = _words(single_k, {}, single_length)
    assert "one snapshot only (k = 4)" in when and "no position sweep" in where
    assert "one slice length only (L = 5000)" in how_much

    empty = dissection_png(None, None, None)
    assert empty.startswith(PNG_MAGIC) and len(empty) > 10_000
    assert [w.split(": ")[0] for w in _words(None, None, None)] == ["when", "where", "how much"]
    assert all("no " in w for w in _words(None, None, None))


def test_markdown_names_every_property_with_its_verdict_and_findings():
    text = dissection_markdown(_results(), _when(), _where(), _how_much())
    lines = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert {"dataset", "optimizer", "lrate"} <= set(lines)
    dataset = lines["dataset"]
    assert " dmc " in dataset and "learned (p<0.01)" in dataset
    assert "accuracy 0.917 [" in dataset and "peak 0.917 at k=4" in dataset
    assert "95 % CI first wholly above chance at k=2" in dataset
    assert "slices starting in conv" in dataset and "0.583 at L=500, 0.917 at L=50000" in dataset
    optimizer = lines["optimizer"]
    assert " stats " in optimizer and "not significant" in optimizer
    assert "95 % CI never wholly above chance" in optimizer
    # stats is optimizer's best model; the sweep and the slice lengths come from dmc and say so
    assert (
        "dmc: slices starting in conv" in optimizer and "dmc: 0.333 at L=500, 0.500 at L=50000" in optimizer
    )
    assert "dmc:" not in dataset
    lrate = lines["lrate"]
    assert "MAE " in lrate and "learned (p<0.01)" in lrate and "below the constant guess" in lrate
    assert "Wilson" in text and "sign-flip" in text


def test_a_sweep_of_the_small_tensors_says_so_in_the_words_and_the_legend():
    where = _where()
    where["dataset"] = WhereCurve(
        0.5 + 0.4 * np.linspace(0, 1, 100), baseline=0.2, model="dmc", region="nonkernel"
    )
    text = dissection_markdown(_results(), _when(), where, _how_much())
    dataset = next(line for line in text.splitlines() if line.startswith("| dataset "))
    assert "within nonkernel: peak 0.900 at 1.00" in dataset and "conv" not in dataset
    fig = dissection_figure(_when(), where, _how_much(), None)
    labels = [text.get_text() for ax in fig.axes if ax.get_legend() for text in ax.get_legend().get_texts()]
    assert any(label.startswith("dataset (") and "dmc in nonkernel" in label for label in labels), labels
