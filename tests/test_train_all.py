"""Meta-classifier training on every property, and bad input to `train`: one line, exit code 2,
nothing registered."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys

import mlflow
import pytest
from mlflow import MlflowClient

from nws import cli
from nws.commands.train import TrainOptions, run_training
from nws.tracking.tags import WEIGHTS_ARTIFACT
from tests.conftest import ROOT

pytestmark = pytest.mark.slow  # every test trains on the session meta zoo or runs main


def test_all_properties_all_models_with_skips(in_meta_zoo, capsys):
    options = TrainOptions(K="3,3", models="stats,layer_stats", props="all", register=False)
    table = run_training(options)
    out = capsys.readouterr().out
    assert "skipping properties that do not vary: batch_norm (always on), filter_size (always 5)" in out
    assert set(table["model"]) == {"stats", "layer_stats"}
    assert {"dataset", "optimizer", "activation", "initialization", "lrate"} <= set(table["property"])
    assert "lrate" in set(table["property"])
    lrate = table[table["property"] == "lrate"].iloc[0]
    assert lrate["net_mae"] > 0 and lrate["constant_guess_mae"] > 0
    assert MlflowClient().search_registered_models() == []
    layer = table[(table["model"] == "layer_stats") & (table["property"] == "initialization")].iloc[0]
    assert layer["net_accuracy"] >= 0.75  # per-layer statistics see the initialisation plainly


BAD = [
    (["--filter", "params.dataset = 'cifar10'"], "filter: no finished net run"),
    (["--props", "colour"], "props: unknown property 'colour'"),
    (["--K", "1,4"], "K: '1,4' is outside 1..3"),
    (["--slice-length", "20000", "--region", "conv"], "slice_length: 20000 is longer than the conv part"),
    (["--props", "depth_conv"], "props: does not vary in the selection: depth_conv (always 3)"),
    (["--models", "svm"], "models: unknown model 'svm'"),
    (["--select-by", "best"], "select_by: 'best' is not one of loss, accuracy"),
    (["--test-fraction", "1.5"], "test_fraction: 1.5 is not in (0, 1)"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("args", "message"), BAD, ids=[b[1].split(":")[0] + str(i) for i, b in enumerate(BAD)]
)
def test_bad_input_is_one_line_exit_2_and_registers_nothing(in_meta_zoo, args, message):
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        code = cli.main(["train", "--slice-length", "128", *args])
    assert code == 2
    lines = stderr.getvalue().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"nws train: error: {message}"), lines
    assert MlflowClient().search_registered_models() == []


def test_a_corrupted_artifact_fails_train_before_anything_is_registered(in_meta_zoo):
    from nws.commands.options import Selection
    from nws.zoo.cache import _local_path

    victim = Selection().query().iloc[3]
    path = _local_path(victim.artifact_uri) / WEIGHTS_ARTIFACT
    original = path.read_bytes()
    try:
        path.write_bytes(original[:-4] + b"\x01\x02\x03\x04")
        done = subprocess.run(
            [sys.executable, "-m", "entrypoints.train", "--slice-length", "128", "--steps", "1"],
            cwd=ROOT, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    finally:
        path.write_bytes(original)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        f"nws train: error: run {victim.run_id}: snapshot artifact is corrupted in the artifact store "
        f"(its digest does not match the run's nws.weights_xxh3 tag)"
    )
    assert MlflowClient().search_registered_models() == []


def test_main_samples_trains_registers_and_prints_the_table(tracking_uri, tmp_path, capsys):
    code = cli.main([
        "main", "--n-nets", "12", "--datasets", "digits", "--max-epochs", "0", "--min-epochs", "0",
        "--prints", "3", "--max-train-images", "64", "--max-eval-images", "32", "--K", "1,3",
        "--props", "initialization,lrate", "--models", "stats", "--slice-length", "256",
        "--slice-lengths", "128", "--storage", str(tmp_path / "optuna.log"), "--campaign", "tiny-main",
    ])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "campaign tiny-main: 12 nets finished, 0 failed" in out
    assert "per net [95 % CI]" in out and "p-value" in out and "binomial" in out
    assert "initialization  stats           256" in out and "lrate           stats           128" in out
    study = mlflow.search_runs(search_all_experiments=True, output_format="list",
                               filter_string="tags.`nws.role` = 'study'")  # fmt: skip
    assert len(study) == 1 and study[0].info.status == "FINISHED"
    parent = f"tags.mlflow.parentRunId = '{study[0].info.run_id}'"
    children = mlflow.search_runs(search_all_experiments=True, output_format="list", filter_string=parent)
    assert sorted(r.data.tags["nws.role"] for r in children) == ["campaign", "meta"]
    meta = next(r for r in children if r.data.tags["nws.role"] == "meta")
    client = MlflowClient()
    assert {"dissection.png", "dissection.md"} <= {a.path for a in client.list_artifacts(meta.info.run_id)}
    assert {"pvalue_initialization_stats", "pvalue_lrate_stats", "n_test_nets_lrate"} <= set(
        meta.data.metrics
    )
    swept = mlflow.search_runs(search_all_experiments=True, output_format="list",
                               filter_string=f"tags.mlflow.parentRunId = '{meta.info.run_id}'")  # fmt: skip
    assert sorted(r.info.run_name for r in swept) == [
        "initialization-stats", "initialization-stats-L128", "lrate-stats", "lrate-stats-L128"
    ]  # fmt: skip
    assert client.get_model_version_by_alias("nws-meta-initialization", "champion") is not None
