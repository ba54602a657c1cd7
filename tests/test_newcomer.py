"""What a newcomer sees of a real `nws main` run off a terminal (a log file): no error-level line of
TensorFlow and no registry chatter, progress lines for every phase, runs in the experiment `nws`,
and registered versions that say what they are. One tiny run serves every check."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.conftest import ROOT

pytestmark = pytest.mark.slow  # one real `nws main`, about a minute

TINY_MAIN = ["--n-nets", "6", "--datasets", "digits,shapes", "--max-epochs", "0", "--min-epochs", "0",
             "--prints", "2", "--K", "1,2", "--max-train-images", "64", "--max-eval-images", "32",
             "--props", "dataset", "--models", "dmc,layer_stats", "--steps", "3", "--validate-every", "1",
             "--slice-length", "256", "--campaign", "newcomer", "--save-optimizer", "false"]  # fmt: skip
TENSORFLOW_ERROR = re.compile(r"^E\d{4} |^E tensorflow| E external/|cuInit|NodeDef mentions")
"""TensorFlow's error-level native line (absl's `E0000 ...`, older `E tensorflow/...`)."""


@pytest.fixture(scope="module")
def tiny_main(tmp_path_factory):
    root = tmp_path_factory.mktemp("newcomer")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_EXPERIMENT")}
    env.update(MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}", NWS_PROGRESS_SECONDS="0",
               NWS_CACHE_DIR=str(root / "cache"), PYTHONPATH=str(ROOT))  # fmt: skip
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # as a newcomer's shell: what nws sets itself must do
    done = subprocess.run([sys.executable, "-m", "nws.cli", "main", *TINY_MAIN], cwd=root, env=env,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    return root, env["MLFLOW_TRACKING_URI"], done.stdout + done.stderr


def test_the_log_has_no_tensorflow_error_banner_or_registry_chatter(tiny_main):
    _, _, log = tiny_main
    noisy = [line for line in log.splitlines() if TENSORFLOW_ERROR.search(line)]
    assert not noisy, noisy
    assert "absl::InitializeLog" not in log and "retracing" not in log
    assert "Successfully registered model" not in log and "Created version" not in log
    assert "dataset / dmc" in log and "registered nws-meta-dataset v1" in log  # our own lines stay


def test_off_a_terminal_every_phase_prints_compact_progress_lines(tiny_main):
    _, _, log = tiny_main
    lines = log.splitlines()
    assert any(re.fullmatch(r"zoo: verifying snapshot files: 6/6 nets in [\d.]+ s", line) for line in lines)
    training = [line for line in lines if line.startswith("dataset / dmc training: ")]
    assert [line.split(": ")[1].split()[0] for line in training] == ["1/3", "2/3", "3/3"], training
    assert re.search(r"dataset / dmc evaluation: 3/3 passes \(position sweep\) in [\d.]+ s", log)
    assert re.search(r"dataset / layer_stats evaluation: 1/1 passes", log)
    assert "\r" not in log  # no bars


def test_the_runs_are_in_the_nws_experiment_and_each_version_says_what_it_is(tiny_main):
    _, uri, _ = tiny_main
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("nws")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=100)
    assert {r.info.experiment_id for r in runs} == {experiment.experiment_id}
    assert sum(r.data.tags.get("nws.role") == "net" for r in runs) == 6
    versions = {v.tags["nws.model"]: v for v in client.search_model_versions("name = 'nws-meta-dataset'")}
    assert sorted(versions) == ["dmc", "layer_stats"]
    for model, version in versions.items():
        tags = version.tags
        source = client.get_run(tags["nws.source_run"])
        assert version.run_id == source.info.run_id and source.data.tags["nws.model"] == model
        assert tags["nws.property"] == "dataset" and tags["nws.k"] == "1,2"
        assert float(tags["nws.chance"]) == pytest.approx(1 / len(source.data.params["classes"].split(",")))
        assert "tags.`nws.campaign` = 'newcomer'" in tags["nws.selection"]
        assert tags["nws.nets"].startswith("6 selected, ")
        assert tags["nws.slice_length"] == ("256" if model == "dmc" else "n/a (whole snapshots)")
        assert version.description.startswith(f"{model} meta-classifier predicting dataset")
        assert (
            tags["nws.score"] in version.description
            or f"{float(tags['nws.score']):.4f}" in version.description
        )


def test_a_dmc_file_holds_no_optimizer_state(tiny_main, tmp_path):
    import json
    import zipfile

    import h5py
    import mlflow

    _, uri, _ = tiny_main
    client = MlflowClient(uri)
    (dmc,) = [
        v for v in client.search_model_versions("name = 'nws-meta-dataset'") if v.tags["nws.model"] == "dmc"
    ]
    mlflow.set_tracking_uri(uri)
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=dmc.source, dst_path=str(tmp_path))
    finally:
        mlflow.set_tracking_uri(None)
    (path,) = Path(local).rglob("dmc.keras")
    with zipfile.ZipFile(path) as archive:
        config = json.loads(archive.read("config.json"))
        archive.extract("model.weights.h5", tmp_path)
    with h5py.File(tmp_path / "model.weights.h5") as weights:
        groups = set(weights)
    assert not config.get("compile_config") and "layers" in groups and "optimizer" not in groups
