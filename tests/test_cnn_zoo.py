"""Issue 18: a Small CNN Zoo directory imported as net runs (`import_cnn_zoo`), accuracy
prediction on them (`train --props test_accuracy`), the robustness protocol, and our own zoo
exported in that layout and read back.

The zoos here are written by the tests in the published format (weights.npy, metrics.csv.gz with
`modeldir`, `step` and `config.*` columns, layout.csv with TensorFlow variable names), tiny: a
conv 3x3x1x4, a conv 3x3x4x4 and a dense 4x10 layer after global pooling, 238 weights.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from nws import cli
from nws.tracking.tags import LAYOUT_ARTIFACT, WEIGHTS_ARTIFACT

LAYOUT = [("sequential/conv2d/kernel:0", (3, 3, 1, 4)), ("sequential/conv2d/bias:0", (4,)),
          ("sequential/conv2d_1/kernel:0", (3, 3, 4, 4)), ("sequential/conv2d_1/bias:0", (4,)),
          ("sequential/dense/kernel:0", (4, 10)), ("sequential/dense/bias:0", (10,))]  # fmt: skip
N_WEIGHTS = sum(int(np.prod(s)) for _, s in LAYOUT)
STEPS = (0, 4, 12)


def write_zoo(directory: Path, n_nets: int = 12, seed: int = 0) -> dict[str, np.ndarray]:
    """A zoo whose nets' weight scale grows with their test accuracy, rows shuffled across
    nets and steps; returns each net's native rows in step order."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    rows, records, nets = [], [], {}
    for i in range(n_nets):
        native = []
        for k, step in enumerate(STEPS):
            accuracy = 0.1 + 0.8 * (i / (n_nets - 1)) * (k + 1) / len(STEPS)
            native.append(rng.normal(0, 0.05 + accuracy, N_WEIGHTS).astype(np.float32))
            records.append({"modeldir": f"net{i}", "step": step, "test_accuracy": accuracy,
                            "train_accuracy": min(1.0, accuracy + 0.02 * (i % 4)), "test_loss": 2 - accuracy,
                            "train_loss": 1.9 - accuracy, "config.learning_rate": 0.001 * (i + 1),
                            "config.activation": "relu" if i % 2 == 0 else "tanh",
                            "config.w_init": "glorot_normal"})  # fmt: skip
        nets[f"net{i}"] = np.stack(native)
        rows += native
    order = rng.permutation(len(rows))
    np.save(directory / "weights.npy", np.stack(rows)[order])
    pd.DataFrame(records).iloc[order].to_csv(directory / "metrics.csv.gz", index=False)
    starts = np.cumsum([0] + [int(np.prod(s)) for _, s in LAYOUT])
    layout = {"varname": [v for v, _ in LAYOUT], "start_idx": starts[:-1], "end_idx": starts[1:],
              "shape": [str(s) for _, s in LAYOUT]}  # fmt: skip
    pd.DataFrame(layout).to_csv(directory / "layout.csv", index=False)
    return nets


def run_cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(args))
    return code, out.getvalue(), err.getvalue()


def net_runs(status: str = "FINISHED") -> list:
    query = f"tags.`nws.role` = 'net' and attributes.status = '{status}'"
    return mlflow.search_runs(search_all_experiments=True, filter_string=query, output_format="list")


def artifact(run, path: str, tmp: Path) -> Path:
    return Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=path,
                                                    dst_path=str(tmp / run.info.run_id)))  # fmt: skip


@pytest.mark.slow
def test_import_reads_every_net_in_step_order_refuses_bad_ones_and_resumes(tracking_uri, tmp_path):
    nets = write_zoo(tmp_path / "zoo")
    weights = np.load(tmp_path / "zoo" / "weights.npy")
    metrics = pd.read_csv(tmp_path / "zoo" / "metrics.csv.gz")
    weights[np.flatnonzero(metrics["modeldir"] == "net3")[1], 7] = np.nan
    metrics.loc[np.flatnonzero(metrics["modeldir"] == "net5")[0], "test_accuracy"] = 1.5
    np.save(tmp_path / "zoo" / "weights.npy", weights)
    metrics.to_csv(tmp_path / "zoo" / "metrics.csv.gz", index=False)

    code, out, err = run_cli("import_cnn_zoo", "--dir", str(tmp_path / "zoo"), "--campaign", "tiny")
    assert code == 1, err
    assert "imported 10 nets, skipped 0 already imported, refused 2" in out
    assert "refused net net3: its weights hold NaN" in err and "refused net net5: test_accuracy" in err
    runs = {r.data.params["source"]: r for r in net_runs()}
    assert len(runs) == 10 and "net3" not in runs
    run = runs["net4"]
    assert run.data.params["config.learning_rate"] == "0.005" and run.data.params["prints"] == "3"
    assert run.data.tags["nws.campaign"] == "tiny" and run.data.tags["nws.weights_shape"] == f"3x{N_WEIGHTS}"
    (trained_on,) = run.inputs.dataset_inputs
    assert trained_on.dataset.name == run.data.params.get("config.dataset", "zoo")
    assert "Small CNN Zoo" in trained_on.dataset.source
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "test_accuracy")
    assert sorted(m.step for m in history if m.step) == [4, 12]
    ours = np.load(artifact(run, WEIGHTS_ARTIFACT, tmp_path))
    native = nets["net4"]  # in step order
    np.testing.assert_array_equal(ours[:, :36].reshape(3, 4, 1, 3, 3),
                                  native[:, :36].reshape(3, 3, 3, 1, 4).transpose(0, 4, 3, 1, 2))  # fmt: skip
    np.testing.assert_array_equal(
        ours[:, 188:228].reshape(3, 10, 4), native[:, 188:228].reshape(3, 4, 10).transpose(0, 2, 1)
    )
    np.testing.assert_array_equal(ours[:, 36:40], native[:, 36:40])
    document = json.loads(artifact(run, LAYOUT_ARTIFACT, tmp_path).read_text())
    assert [t["keras_layer"] + "/" + t["tensor"] for t in document["tensors"]][:2] == [
        "sequential/conv2d/kernel", "sequential/conv2d/bias"]  # fmt: skip
    assert [s["step"] for s in document["snapshots"]] == list(STEPS)
    assert document["weightn_conv"] == 188 and document["config"]["config.w_init"] == "glorot_normal"

    code, out, _ = run_cli("import_cnn_zoo", "--dir", str(tmp_path / "zoo"), "--campaign", "tiny",
                           "--allow-refused", "true")  # fmt: skip
    assert code == 0 and "imported 0 nets, skipped 10 already imported, refused 2" in out
    assert len(net_runs()) == 10


@pytest.mark.slow
def test_a_directory_that_is_not_a_zoo_is_one_line_and_no_run(tracking_uri, tmp_path):
    write_zoo(tmp_path / "zoo", n_nets=3)
    (tmp_path / "zoo" / "layout.csv").unlink()
    code, _, err = run_cli("import_cnn_zoo", "--dir", str(tmp_path / "zoo"))
    assert code == 2 and err.strip().startswith("nws import_cnn_zoo: error: dir: ") and "no layout.csv" in err
    write_zoo(tmp_path / "short", n_nets=3)
    metrics = pd.read_csv(tmp_path / "short" / "metrics.csv.gz")
    metrics.iloc[:-1].to_csv(tmp_path / "short" / "metrics.csv.gz", index=False)
    code, _, err = run_cli("import_cnn_zoo", "--dir", str(tmp_path / "short"))
    assert code == 2 and "metrics.csv.gz has 8 rows, weights.npy 9" in err
    code, _, err = run_cli("import_cnn_zoo", "--dir", str(tmp_path / "missing"))
    assert code == 2 and "is not a directory" in err
    assert not net_runs() and not mlflow.search_runs(search_all_experiments=True, output_format="list")


@pytest.mark.slow
def test_train_predicts_test_accuracy_of_an_imported_zoo_and_the_robustness_protocol(tracking_uri, tmp_path):
    write_zoo(tmp_path / "zoo", n_nets=16)
    assert run_cli("import_cnn_zoo", "--dir", str(tmp_path / "zoo"))[0] == 0
    code, out, err = run_cli(
        "train", "--props", "test_accuracy", "--K", "3,3", "--models",
        "stats,layer_stats,invariant,dmc", "--slice-length", "32", "--steps", "3", "--test-fraction", "0.25",
        "--robustness", "permute,rescale", "--cache-dir", str(tmp_path / "cache"),
    )  # fmt: skip
    assert code == 0, err
    parent = mlflow.search_runs(search_all_experiments=True, filter_string="tags.`nws.role` = 'meta'",
                                output_format="list")[0]  # fmt: skip
    metrics = parent.data.metrics
    for model in ("stats", "layer_stats", "invariant", "dmc"):
        for score in ("tau", "r2", "mae"):
            value, low, high = (
                metrics[f"{score}{part}_test_accuracy_{model}"] for part in ("", "_ci_low", "_ci_high")
            )
            assert low <= high or np.isnan(value)  # NaN: a model that predicts one value
        assert (
            f"tau_test_accuracy_{model}_permute" in metrics
            and f"netmae_test_accuracy_{model}_rescale" in metrics
        )
    # The weight scale grows with the accuracy, which the per-layer statistics read.
    assert metrics["tau_test_accuracy_layer_stats"] > 0.5
    # Renumbering hidden units changes nothing for the invariant model (nor for layer statistics).
    for model in ("invariant", "layer_stats"):
        assert metrics[f"netmae_test_accuracy_{model}_permute"] == pytest.approx(
            metrics[f"netmae_test_accuracy_{model}"], abs=1e-5)  # fmt: skip
    child = mlflow.search_runs(search_all_experiments=True, output_format="list", filter_string=(
        "tags.`nws.property` = 'test_accuracy' and tags.`nws.model` = 'invariant'"))[0]  # fmt: skip
    assert (
        child.data.metrics["n_permuted"] == 4 and 0 < child.data.metrics["n_rescaled"] < 4
    )  # relu nets only
    results = pd.read_csv(artifact(parent, "results.csv", tmp_path))
    assert {"tau", "tau_ci_low", "r2", "mae", "net_mae_permute", "tau_rescale"} <= set(results.columns)
    assert "tau" in out and "permute:" in out
    model = mlflow.pyfunc.load_model("models:/nws-meta-test-accuracy@champion")
    weights = np.load(artifact(net_runs()[0], WEIGHTS_ARTIFACT, tmp_path))
    predicted = model.predict(weights[-1:])
    assert predicted.shape == (1,) and 0.0 <= float(predicted[0]) <= 1.0


def test_snapshot_targets_are_read_per_snapshot_and_checked_over_k():
    from nws.errors import DataError
    from nws.zoo.targets import check_values, snapshot_values

    documents = [{"snapshots": [{"snapshot": 1, "train_accuracy": 0.5, "test_accuracy": 0.4},
                                {"snapshot": 2, "train_accuracy": 0.9, "test_accuracy": 0.7}]},
                 {"snapshots": [{"snapshot": 2, "train_accuracy": 0.8, "test_accuracy": 0.8}]}]  # fmt: skip
    np.testing.assert_allclose(snapshot_values(documents, "test_accuracy", 2), [[0.4, 0.7], [np.nan, 0.8]])
    np.testing.assert_allclose(
        snapshot_values(documents, "generalization_gap", 2), [[0.1, 0.2], [np.nan, 0.0]]
    )
    check_values(snapshot_values(documents, "test_accuracy", 2), ["a", "b"], "test_accuracy", (2, 2))
    with pytest.raises(DataError, match="run b: no test_accuracy at snapshot 1"):
        check_values(snapshot_values(documents, "test_accuracy", 2), ["a", "b"], "test_accuracy", (1, 2))


def test_regression_scores_have_intervals_over_nets():
    from nws.meta.regression import regression_scores

    rng = np.random.default_rng(0)
    truth = rng.uniform(0, 1, 40)
    scores = regression_scores(truth, truth + rng.normal(0, 0.05, 40), np.arange(40) // 2, seed=1)
    assert scores["tau"] > 0.8 and scores["tau_ci_low"] < scores["tau"] < scores["tau_ci_high"] <= 1
    assert scores["r2"] > 0.9 and 0 < scores["mae_ci_low"] < scores["mae"] < scores["mae_ci_high"]
    assert regression_scores(truth, -truth, np.arange(40))["tau"] == pytest.approx(-1.0)
    same = regression_scores(truth, np.full(40, 0.5), np.arange(40))
    assert np.isnan(same["tau"]) and same["mae"] == pytest.approx(np.abs(truth - 0.5).mean())


@pytest.mark.slow
def test_our_zoo_exported_as_a_small_cnn_zoo_imports_back_with_equal_values(
    in_meta_zoo, tmp_path, monkeypatch
):
    from nws.commands.export_nws import ExportOptions, run_export

    originals = {}
    for run in net_runs():
        originals[run.info.run_id] = np.load(artifact(run, WEIGHTS_ARTIFACT, tmp_path / "original"))
    layout = json.loads(artifact(net_runs()[0], LAYOUT_ARTIFACT, tmp_path).read_text())["tensors"]
    run_export(ExportOptions(out=str(tmp_path / "full"), format="cnn_zoo"))
    run_export(ExportOptions(out=str(tmp_path / "kb"), format="cnn_zoo", kernels_only=True))
    kept = [t for t in layout if t["tensor"] in ("kernel", "bias")]
    varnames = pd.read_csv(tmp_path / "kb" / "layout.csv")["varname"]
    assert len(kept) < len(layout) and all(v.endswith(("kernel:0", "bias:0")) for v in varnames)
    metrics = pd.read_csv(tmp_path / "full" / "metrics.csv.gz")
    assert {"config.learning_rate", "config.w_init", "config.optimizer", "config.activation", "step"} <= set(
        metrics.columns
    )
    for name in ("full", "kb"):
        uri = f"sqlite:///{tmp_path / name}.db"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        assert run_cli("import_cnn_zoo", "--dir", str(tmp_path / name))[0] == 0
        runs = net_runs()
        assert len(runs) == len(originals)
        for run in runs:
            original = originals[run.data.params["source"]]  # our export names each net by its run id
            imported = np.load(artifact(run, WEIGHTS_ARTIFACT, tmp_path / name))
            if name == "full":
                np.testing.assert_array_equal(imported, original)
            else:
                expected = np.concatenate(
                    [original[:, t["offset"] : t["offset"] + t["size"]] for t in kept], axis=1
                )
                np.testing.assert_array_equal(imported, expected)
            assert run.data.params["config.optimizer"] in ("adam", "rmsprop", "momentum")
