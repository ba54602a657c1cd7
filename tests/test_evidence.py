"""Issue 14 end to end through `nws train`: the statistics of every (property, model) on the
parent run, on its child runs and in results.csv, the printed table, the slice-length sweep, the
dissection on the parent run, and per-net confusion counts; issue 16: no metric empty by design
when two classification runs are compared."""

from __future__ import annotations

import contextlib
import io
import math

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from nws import cli
from nws.meta.statistics import bootstrap_mean_ci, count_statistics, mae_statistics
from nws.tracking.tags import TAG_ROLE

PROPS = ("initialization", "lrate")
MODELS = ("stats", "layer_stats")
ARGS = ["--props", ",".join(PROPS), "--models", ",".join(MODELS), "--K", "1,2", "--slice-length", "128",
        "--slice-lengths", "64,128", "--seed", "1", "--register", "false",
        "--region", "all"]  # fmt: skip  # the position sweep's conv | fc words need the whole vector
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _train(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(["train", *args])
    return code, out.getvalue(), err.getvalue()


def _text(run_id: str, path: str) -> str:
    return mlflow.artifacts.load_text(f"runs:/{run_id}/{path}")


def _csv(run_id: str, path: str) -> pd.DataFrame:
    return pd.read_csv(io.StringIO(_text(run_id, path)))


@pytest.fixture(scope="module")
def trained(meta_zoo, tmp_path_factory):
    """One `nws train` on the meta zoo (a classification property and the learning rate, a K
    range, a slice-length sweep); its parent run, its children and what it printed."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", meta_zoo.tracking_uri)
        patch.setenv("NWS_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        patch.chdir(meta_zoo.root)
        mlflow.set_tracking_uri(meta_zoo.tracking_uri)
        code, out, err = _train(ARGS)
        assert code == 0, err
        client = MlflowClient()
        parent = client.search_runs(
            [e.experiment_id for e in client.search_experiments()],
            f"tags.`{TAG_ROLE}` = 'meta'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )[0]
        children = client.search_runs(
            [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
        )
        yield parent, children, out
        mlflow.set_tracking_uri(None)


def _main_children(children):
    """The (property, model) children at the main slice length (not the sweep's)."""
    return {
        (c.data.tags["nws.property"], c.data.tags["nws.model"]): c
        for c in children
        if c.data.tags.get("nws.slice_length", "128") == "128"
    }


def _expected(child, selection: pd.DataFrame, seed: int = 1):
    """What statistics.py computes from the child's logged per-net predictions."""
    per_net = _csv(child.info.run_id, "per_net.csv")
    prop = child.data.tags["nws.property"]
    if prop != "lrate":
        classes = child.data.params["classes"].split(",")
        correct = int((per_net["true_value"].astype(str) == per_net["predicted_value"].astype(str)).sum())
        return count_statistics(correct, len(per_net), 1 / len(classes))
    train = selection[selection["split_lrate"] == "train"]["lrate"]
    guess = float(np.median(train))
    return mae_statistics(per_net["true_value"], per_net["predicted_value"], guess, seed=seed)


def test_parent_and_child_runs_carry_the_statistics_that_the_per_net_predictions_give(trained):
    parent, children, _ = trained
    metrics = parent.data.metrics
    selection = _csv(parent.info.run_id, "selection.csv")
    main = _main_children(children)
    assert set(main) == {(p, m) for p in PROPS for m in MODELS}
    for (prop, model), child in main.items():
        expected = _expected(child, selection)
        estimate = "netmae" if prop == "lrate" else "netacc"
        assert metrics[f"{estimate}_{prop}_{model}"] == pytest.approx(expected.estimate)
        assert metrics[f"ci_low_{prop}_{model}"] == pytest.approx(expected.ci_low)
        assert metrics[f"ci_high_{prop}_{model}"] == pytest.approx(expected.ci_high)
        assert metrics[f"pvalue_{prop}_{model}"] == pytest.approx(expected.pvalue)
        assert metrics[f"n_test_nets_{prop}"] == expected.n == int(child.data.params["n_test_nets"])
        for name in ("ci_low", "ci_high", "pvalue"):
            assert child.data.metrics[name] == pytest.approx(metrics[f"{name}_{prop}_{model}"])
        assert child.data.metrics["n_test_nets"] == expected.n
    # the bootstrap interval is of the per-net absolute errors, resampling nets
    lrate = _csv(main["lrate", "stats"].info.run_id, "per_net.csv")
    low, high = bootstrap_mean_ci(np.abs(lrate["predicted_value"] - lrate["true_value"]), seed=1)
    assert (metrics["ci_low_lrate_stats"], metrics["ci_high_lrate_stats"]) == pytest.approx((low, high))
    # the initialisation is plainly encoded at snapshot 1: someone must find it significant
    assert min(metrics[f"pvalue_initialization_{m}"] for m in MODELS) < 0.01


def test_results_csv_and_the_printed_table(trained):
    parent, _, out = trained
    results = _csv(parent.info.run_id, "results.csv")
    for column in ("n_test_nets", "ci_low", "ci_high", "pvalue", "significant", "verdict", "slice_length"):
        assert column in results, column
    metrics = parent.data.metrics
    main = results[results["slice_length"].isna() | (results["slice_length"] == 128)]
    assert len(main) == len(PROPS) * len(MODELS)
    for row in main.itertuples():
        assert row.pvalue == pytest.approx(metrics[f"pvalue_{row.property}_{row.model}"])
        assert row.significant == (row.pvalue < 0.01)
        assert (row.verdict == "learned (p<0.01)") == row.significant
    lines = out.strip().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("property"))
    table = lines[header + 1 : header + 1 + len(results)]
    assert "[95 % CI]" in lines[header] and "p-value" in lines[header] and " L " in lines[header]
    assert any("binomial" in line for line in lines[header + 1 :])
    for line in table:
        assert "[" in line and "]" in line  # the interval
        significant = line.endswith("* learned (p<0.01)")
        assert significant or line.endswith("not significant"), line
    assert sum("* learned" in line for line in table) == int(results["significant"].sum()) > 0
    assert sum("learned" in line for line in out.splitlines()) == int(results["significant"].sum())


def test_slice_lengths_make_one_child_per_length_tagged(trained):
    parent, children, _ = trained
    by_length = {}
    for child in children:
        if child.data.tags["nws.model"] == "stats":
            by_length.setdefault(child.data.tags["nws.slice_length"], []).append(child)
        else:
            assert "nws.slice_length" not in child.data.tags  # whole-snapshot models have no slices
    assert sorted(by_length, key=int) == ["64", "128"]
    for length, runs in by_length.items():
        assert sorted(r.data.tags["nws.property"] for r in runs) == sorted(PROPS)
        assert all(r.data.params["meta_slice_length"] == length for r in runs)
    assert len(children) == len(PROPS) * (len(MODELS) + 1)
    results = _csv(parent.info.run_id, "results.csv")
    swept = results[results["model"] == "stats"]
    assert sorted(swept["slice_length"].astype(int).unique()) == [64, 128]


def test_dissection_on_the_parent_run(trained):
    parent, _, _ = trained
    run_id = parent.info.run_id
    artifacts = {a.path for a in MlflowClient().list_artifacts(run_id)}
    assert {"dissection.png", "dissection.md", "results.png", "results.csv"} <= artifacts
    png = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="dissection.png")
    with open(png, "rb") as f:
        assert f.read(8) == PNG_MAGIC
    from PIL import Image

    width, height = Image.open(png).size
    assert width > 1000 and height > 500  # accuracy and the learning rate's MAE: two rows
    text = _text(run_id, "dissection.md")
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert set(PROPS) <= set(rows)
    for prop in PROPS:
        assert "at k=" in rows[prop]  # when: two snapshots
        assert " at L=64, " in rows[prop] and " at L=128" in rows[prop]  # how much: the sweep
        assert "slices starting in conv" in rows[prop]  # where: the position sweep, region all


def test_confusion_counts_test_nets(trained):
    _, children, _ = trained
    for (prop, model), child in _main_children(children).items():
        if prop == "lrate":
            continue
        counts = pd.read_csv(io.StringIO(_text(child.info.run_id, "confusion.csv")), index_col=0)
        per_net = _csv(child.info.run_id, "per_net.csv")
        assert counts.to_numpy().sum() == int(child.data.params["n_test_nets"]) == len(per_net)
        expected = pd.crosstab(per_net["true_value"], per_net["predicted_value"])
        for true, row in expected.iterrows():
            for predicted, count in row.items():
                assert counts.loc[true, predicted] == count, (prop, model, true, predicted)


def test_no_metric_is_empty_by_design_when_comparing_classification_runs(trained):
    parent, children, _ = trained
    for run in [parent, *children]:
        assert all(math.isfinite(v) for v in run.data.metrics.values()), run.info.run_name
    classification = [set(c.data.metrics) for c in children if c.data.tags["nws.property"] != "lrate"]
    lrate = [set(c.data.metrics) for c in children if c.data.tags["nws.property"] == "lrate"]
    assert len(classification) == 3 and len(lrate) == 3  # stats at two lengths, layer_stats
    assert all(keys == classification[0] for keys in classification)  # slice and whole-snapshot models
    assert all(keys == lrate[0] for keys in lrate)
    assert not {k for k in classification[0] if "mae" in k}
    assert {"ci_low", "ci_high", "pvalue", "n_test_nets"} <= classification[0] & lrate[0]
    # a train without the learning rate: its parent has no learning-rate metric at all
    code, _, err = _train(["--props", "initialization", "--models", "layer_stats", "--K", "1,1",
                           "--register", "false"])  # fmt: skip
    assert code == 0, err
    client = MlflowClient()
    latest = client.search_runs(
        [parent.info.experiment_id], f"tags.`{TAG_ROLE}` = 'meta'", order_by=["attributes.start_time DESC"]
    )[0]
    assert latest.info.run_id != parent.info.run_id
    assert set(latest.data.metrics) == {
        "acc_initialization_layer_stats", "netacc_initialization_layer_stats", "chance_initialization",
        "ci_low_initialization_layer_stats", "ci_high_initialization_layer_stats",
        "pvalue_initialization_layer_stats", "n_test_nets_initialization",
    }  # fmt: skip


BAD = [
    (["--slice-lengths", "64,0"], "slice_lengths: '64,0' is not a comma list of positive integers"),
    (["--slice-lengths", "64,abc"], "slice_lengths: '64,abc' is not a comma list of positive integers"),
    (["--slice-lengths", "64,100000"], "slice_lengths: 100000 is longer than the all part of run"),
    (["--slice-lengths", "64", "--models", "layer_stats"], "slice_lengths: no slice model"),
]


@pytest.mark.parametrize(("args", "message"), BAD, ids=["zero", "word", "too-long", "no-slice-model"])
def test_bad_slice_lengths_are_one_line_and_exit_2(in_meta_zoo, args, message):
    code, _, err = _train(["--slice-length", "128", "--K", "1,1", "--props", "initialization", *args])
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"nws train: error: {message}"), lines


def test_main_refuses_a_sweep_length_longer_than_the_architecture_before_sampling(tracking_uri):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli.main(["main", "--slice-lengths", "256,99999"])
    assert code == 2
    line = err.getvalue().strip()
    assert line.startswith("nws main: error: slice_lengths: 99999 is longer than the all part of the fixed")
    assert mlflow.search_runs(search_all_experiments=True).empty
