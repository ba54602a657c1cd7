"""The `sample` entry point end to end: MLflow runs, params, metrics, artifacts, the Optuna view,
continuation, replay, reproducibility and failures."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pandas as pd
import pytest

from nws.campaign.net_job import NetJob
from nws.campaign.storage import open_storage
from nws.commands.sample import SampleOptions, run_campaign
from nws.errors import ParameterError
from nws.net.snapshots import select_prints, weight_layout
from nws.net.training import TrainSettings
from nws.processes import worker_name
from nws.space import PROPERTY_NAMES, NetConfig
from nws.tracking.artifacts import weights_digest
from nws.tracking.tags import (
    CURVE_ARTIFACT,
    HISTORY_ARTIFACT,
    LAYOUT_ARTIFACT,
    TAG_CAMPAIGN,
    TAG_FAILURE,
    TAG_ROLE,
    TAG_SEED,
    TAG_SNAPSHOTS,
    TAG_STUDY,
    TAG_SUBSET,
    TAG_TRIAL,
    TAG_WEIGHTS_DIGEST,
    TAG_WORKER,
    WEIGHTS_ARTIFACT,
)
from tests.conftest import ROOT, ZOO_PARAMETERS


def net_runs(campaign: str | None = None, status: str | None = None):
    query = f"tags.`{TAG_ROLE}` = 'net'"
    if campaign:
        query += f" and tags.`{TAG_CAMPAIGN}` = '{campaign}'"
    if status:
        query += f" and attributes.status = '{status}'"
    return mlflow.search_runs(search_all_experiments=True, filter_string=query, output_format="list")


def download(run_id: str, path: str, dst) -> str:
    return mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(dst))


def test_each_net_is_a_finished_nested_run_with_its_properties(in_zoo):
    runs = net_runs("e2e")
    assert len(runs) == 3
    project = mlflow.get_run(in_zoo.project_run_id)
    assert project.info.status == "FINISHED"
    assert project.data.tags[TAG_ROLE] == "campaign"
    assert project.data.params["n_nets"] == "3"  # MLproject parameters stay as given
    seeds = set()
    for run in runs:
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == in_zoo.project_run_id
        params = run.data.params
        config = NetConfig.from_mapping({k: params[k] for k in PROPERTY_NAMES})
        assert config.dataset in {"digits", "shapes"}
        assert params["optimizer"] in {"adam", "rmsprop", "momentum"}
        assert params["initialization"] in {"constant", "normal", "glorot_uniform", "glorot_normal"}
        assert params["batch_norm"] == "on"
        assert params["prints"] == "4" and params["max_train_images"] == "150"
        assert params["train_max_epochs"] == "2"
        tags = run.data.tags
        assert tags[TAG_SUBSET] == "main"
        assert tags[TAG_STUDY] == "e2e"
        assert tags[TAG_SNAPSHOTS] == "complete"
        assert tags[TAG_SEED] == params["seed"]
        seeds.add(params["seed"])
        layout = weight_layout(config)
        assert run.data.metrics["weightn_conv"] == layout.weightn_conv
        assert run.data.metrics["weightn_fc"] == layout.weightn_fc
        assert run.data.metrics["epochs"] == 2
    assert len(seeds) == 3
    assert sorted(int(r.data.tags[TAG_TRIAL]) for r in runs) == [0, 1, 2]


def test_metrics_are_logged_per_epoch(in_zoo):
    client = mlflow.MlflowClient()
    for run in net_runs("e2e"):
        for name in ("train_accuracy", "valid_accuracy", "test_accuracy", "loss"):
            history = client.get_metric_history(run.info.run_id, name)
            assert sorted(m.step for m in history) == [0, 1, 2], name
        final = max(client.get_metric_history(run.info.run_id, "test_accuracy"), key=lambda m: m.step)
        assert run.data.metrics["test_accuracy"] == final.value
        assert run.data.metrics["train_seconds"] > 0


def test_snapshot_artifacts_have_the_contract_shape_and_content(in_zoo, tmp_path):
    for run in net_runs("e2e"):
        run_id = run.info.run_id
        config = NetConfig.from_mapping({k: run.data.params[k] for k in PROPERTY_NAMES})
        layout = weight_layout(config)
        weights = np.load(download(run_id, WEIGHTS_ARTIFACT, tmp_path / run_id))
        assert weights.shape == (4, layout.n_weights) and weights.dtype == np.float32
        assert weights_digest(weights) == run.data.tags[TAG_WEIGHTS_DIGEST]
        doc = json.loads(Path(download(run_id, LAYOUT_ARTIFACT, tmp_path / run_id)).read_text())
        assert doc["n_weights"] == layout.n_weights
        assert doc["conv_fc_boundary"] == layout.weightn_conv
        assert doc["tensors"][0]["offset"] == 0 and doc["tensors"][-1]["layer"] == "fc_final"
        # Three evaluations (epochs 0..2) spread over four prints: round(linspace(1, 3, 4)).
        expected = (select_prints(3, 4) - 1).tolist()
        assert [s["epoch"] for s in doc["snapshots"]] == expected
        assert [s["snapshot"] for s in doc["snapshots"]] == [1, 2, 3, 4]
        history = pd.read_csv(download(run_id, HISTORY_ARTIFACT, tmp_path / run_id))
        assert history["epoch"].tolist() == [0, 1, 2]
        assert doc["snapshots"][-1]["test_accuracy"] == pytest.approx(history["test_accuracy"].iloc[-1])
        png = Path(download(run_id, CURVE_ARTIFACT, tmp_path / run_id)).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_optuna_study_is_a_second_view_of_the_campaign(in_zoo):
    study = optuna.load_study(study_name="e2e", storage=open_storage(in_zoo.storage))
    runs = {r.info.run_id: r for r in net_runs("e2e")}
    assert study.user_attrs["subset"] == "main"
    assert len(study.trials) == 3
    for trial in study.trials:
        assert trial.state == optuna.trial.TrialState.COMPLETE
        run = runs[trial.user_attrs["mlflow_run_id"]]
        assert trial.value == pytest.approx(run.data.metrics["test_accuracy"])
        assert str(trial.params["optimizer"]) == run.data.params["optimizer"]
        assert str(trial.user_attrs["seed"]) == run.data.params["seed"]


def tiny_options(**changes) -> SampleOptions:
    """The session zoo's parameters as SampleOptions, with changes."""
    kinds = {f.name: {"int": int, "float": float}.get(str(f.type), str)
             for f in dataclasses.fields(SampleOptions)}  # fmt: skip
    base = {k: kinds[k](v) for k, v in ZOO_PARAMETERS.items()}
    return dataclasses.replace(SampleOptions(**base), **changes)


def test_a_second_call_continues_the_campaign_and_refuses_another_space(in_zoo):
    summary = run_campaign(tiny_options(n_nets=1, storage=in_zoo.storage))
    assert len(summary.finished) == 1
    run = mlflow.get_run(summary.finished[0])
    assert run.data.tags[TAG_TRIAL] == "3"
    assert run.data.params["seed"] == "4"  # campaign seed 1 + trial 3
    with pytest.raises(ParameterError, match=r"^subset: campaign 'e2e' was started with subset=main"):
        run_campaign(tiny_options(n_nets=1, storage=in_zoo.storage, subset="fixed"))


def test_same_seed_gives_the_same_configuration_and_bit_identical_snapshots(in_zoo, tmp_path):
    first = next(r for r in net_runs("e2e") if r.data.tags[TAG_TRIAL] == "0")
    summary = run_campaign(tiny_options(n_nets=1, campaign="again", storage=str(tmp_path / "optuna.log")))
    again = mlflow.get_run(summary.finished[0])
    for name in PROPERTY_NAMES:
        assert again.data.params[name] == first.data.params[name]
    a = np.load(download(first.info.run_id, WEIGHTS_ARTIFACT, tmp_path / "a"))
    b = np.load(download(again.info.run_id, WEIGHTS_ARTIFACT, tmp_path / "b"))
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_replay_of_an_explicit_configuration(tracking_uri, tmp_path):
    text = "shapes,0.003,64,1,0,1,3,1,3,4,3,4,64"
    summary = run_campaign(
        tiny_options(n_nets=1, campaign="replay", config=text, storage=str(tmp_path / "o.log"))
    )
    run = mlflow.get_run(summary.finished[0])
    assert NetConfig.from_mapping({k: run.data.params[k] for k in PROPERTY_NAMES}) == NetConfig.parse(text)
    assert run.data.params["optimizer"] == "rmsprop" and run.data.params["activation"] == "tanh"


def start_campaign_run():
    return mlflow.start_run(tags={TAG_ROLE: "campaign"})


@pytest.mark.slow
def test_a_diverging_net_ends_failed_with_its_reason(tracking_uri):
    options = tiny_options(prints=3)
    exploding = dataclasses.replace(NetConfig.parse("shapes,0.003,32,1,0,2,0,0,3,3,2,4,64"), lrate=1e12)
    with start_campaign_run():
        campaign = dataclasses.replace(options.settings(), train=TrainSettings(max_epochs=3, min_epochs=3))
        job = NetJob(campaign, 0, exploding, {})
        outcome = job.run(observers=[])
    assert not outcome.finished and "NaN" in outcome.failure
    run = mlflow.get_run(outcome.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags[TAG_FAILURE].startswith("nan_loss")
    assert TAG_SNAPSHOTS not in run.data.tags


@pytest.mark.slow
def test_a_crash_mid_training_never_leaves_a_finished_run(tracking_uri):
    options = tiny_options(prints=3)
    config = NetConfig.parse("shapes,0.003,32,1,0,0,0,2,3,3,2,4,64")

    def crash(_model, epoch, _metrics):
        if epoch == 1:
            raise OSError("disk full")

    with start_campaign_run(), pytest.raises(OSError, match="disk full"):
        campaign = dataclasses.replace(options.settings(), train=TrainSettings(max_epochs=3, min_epochs=3))
        NetJob(campaign, 0, config, {}).run([crash])
    (run,) = net_runs()
    assert run.info.status == "FAILED"
    assert run.data.tags[TAG_FAILURE] == "OSError: disk full"
    assert TAG_SNAPSHOTS not in run.data.tags
    assert mlflow.MlflowClient().list_artifacts(run.info.run_id) == []


@pytest.mark.slow
def test_a_campaign_named_with_a_quote_finds_its_own_runs(tracking_uri, tmp_path):
    """Runs are found by their campaign's tag, the name quoted in the search filter: with a single
    quote or a double one, `main`'s selection finds the campaign's net and no other, and `cleanup`
    (as a resumed campaign) finds and closes its run left RUNNING by a process that is gone."""
    from nws.commands.cleanup import CleanupOptions, run_cleanup
    from nws.commands.main import MainOptions, training_options

    storage, client = str(tmp_path / "optuna.log"), mlflow.MlflowClient()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    finished = {}
    for name in ("it's", 'the "best"'):
        options = tiny_options(n_nets=1, campaign=name, storage=storage, max_epochs=0, min_epochs=0)
        finished[name] = run_campaign(options).finished
    for name, nets in finished.items():
        selected = training_options(MainOptions(campaign=name), "nws").query()
        assert list(selected["run_id"]) == nets and set(selected["campaign"]) == {name}
        tags = {TAG_ROLE: "net", TAG_CAMPAIGN: name, TAG_WORKER: worker_name(gone.pid)}
        orphan = client.create_run(client.get_experiment_by_name("nws").experiment_id, tags=tags)
        (entry,) = run_cleanup(CleanupOptions(campaign=name, storage=storage))
        assert (entry.what, entry.closed) == (f"net run {orphan.info.run_id}", True)
        assert client.get_run(orphan.info.run_id).info.status == "FAILED"


BAD_INPUTS = [
    (["--n-nets", "0"], "n_nets: 0 is below 1"),
    (["--n-nets", "two"], "argument --n-nets/--n_nets: invalid int value: 'two'"),
    (["--subset", "huge"], "subset: 'huge' is not one of fixed, main"),
    (["--prints", "1"], "prints: 1 is below 2"),
    (["--min-epochs", "30", "--max-epochs", "10"], "min_epochs: 30 is larger than max_epochs (10)"),
    (["--datasets", "imagenet"], "datasets: unknown dataset 'imagenet'"),
    (["--config", "mnist,0.001,64,1,0,0,0,2,7,3,2,8,128", "--subset", "fixed"],
     "config.filter_size: 7 is outside the fixed subset"),
    (["--config", "mnist,0.9,64,1,0,0,0,2,5,3,2,8,128"], "lrate: 0.9 is outside the range"),
    (["--datasets", "svhn", "--download", "false"], "dataset svhn: train_32x32.mat not found"),
    (["--campaign", 'say "it\'s"'], "campaign: 'say \"it\\'s\"' holds both ' and \", which an MLflow"),
]  # fmt: skip


@pytest.mark.parametrize(("args", "message"), BAD_INPUTS, ids=[a[1].split(":")[0] for a in BAD_INPUTS])
def test_bad_input_is_one_line_nonzero_exit_and_no_finished_run(
    tracking_uri, tmp_path, monkeypatch, capsys, args, message
):
    """In-process through the CLI's main (the next test runs the real process)."""
    from nws.cli import main

    monkeypatch.setenv("NWS_DATA_DIR", str(tmp_path / "data"))
    try:
        code = main(["sample", "--storage", str(tmp_path / "o.log"), *args])
    except SystemExit as exit:  # argparse's usage errors
        code = exit.code
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"nws sample: error: {message}")
    assert net_runs(status="FINISHED") == []


@pytest.mark.slow
def test_bad_input_from_the_entry_point_process_is_one_line_on_stderr(tracking_uri, tmp_path):
    env = {**os.environ, "NWS_DATA_DIR": str(tmp_path / "data")}
    done = subprocess.run(
        [sys.executable, "-m", "entrypoints.sample", "--storage", str(tmp_path / "o.log"),
         "--datasets", "svhn", "--download", "false"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"nws sample: error: dataset svhn: train_32x32.mat not found under {tmp_path / 'data' / 'svhn'} "
        "(expected the official files: train_32x32.mat, test_32x32.mat) (downloads are off)"
    ]
    assert net_runs(status="FINISHED") == []


@pytest.mark.slow
def test_bad_input_through_mlflow_run_is_our_line_then_mlflows_own_report(tracking_uri, tmp_path):
    """`mlflow run` reports the failure itself: after our one line (the last thing nws prints, no
    traceback) comes MLflow's line, the exit code is MLflow's 1, and the project run is FAILED."""
    done = subprocess.run(
        [sys.executable, "-m", "mlflow", "run", str(ROOT), "-e", "sample", "--env-manager", "local",
         "-P", "n_nets=0", "-P", f"storage={tmp_path / 'o.log'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 1
    assert "Traceback" not in done.stderr + done.stdout
    lines = done.stderr.strip().splitlines()
    ours = lines.index("nws sample: error: n_nets: 0 is below 1")
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert [r.info.status for r in runs] == ["FAILED"]
    after = [line.split(" ", 2)[-1] for line in lines[ours + 1 :]]
    assert after == [f"ERROR mlflow.cli: === Run (ID '{runs[0].info.run_id}') failed ==="]
