"""Which MLflow experiment runs go to and queries look in (`nws.tracking.experiments`): the named
default `nws`, MLflow's variables, the entry points' `experiment` option, and the run that
`mlflow run` already made. Real SQLite stores."""

from __future__ import annotations

import mlflow
import pytest
from mlflow import MlflowClient

from nws.commands.options import Selection
from nws.errors import ParameterError
from nws.space import PROPERTY_NAMES
from nws.tracking.experiments import DEFAULT_EXPERIMENT, working_experiment
from nws.tracking.runs import parent_run
from nws.tracking.tags import (
    SNAPSHOTS_COMPLETE,
    TAG_ROLE,
    TAG_SNAPSHOTS,
    TAG_WEIGHTS_DIGEST,
    TAG_WEIGHTS_SHAPE,
)


@pytest.fixture
def clean_environment(tracking_uri, monkeypatch):
    for name in ("MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    return tracking_uri


def experiment_of(run) -> str:
    return MlflowClient().get_experiment(run.info.experiment_id).name


def test_runs_go_to_the_nws_experiment_by_default_and_nested_runs_beside_their_parent(clean_environment):
    assert MlflowClient().get_experiment_by_name(DEFAULT_EXPERIMENT) is None
    with (
        parent_run({TAG_ROLE: "study"}, run_name="outer") as outer,
        parent_run(run_name="in", nested=True) as inner,
    ):
        pass
    assert experiment_of(outer) == experiment_of(inner) == "nws"
    assert MlflowClient().get_run(inner.info.run_id).data.tags["mlflow.parentRunId"] == outer.info.run_id
    # MLflow 3's UI opens an experiment on its training runs, not its GenAI layout, by this tag
    tags = MlflowClient().get_experiment_by_name("nws").tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"


def test_an_experiment_made_elsewhere_is_tagged_unless_it_says_what_it_is(clean_environment, monkeypatch):
    client = MlflowClient()
    plain = client.create_experiment("plain")
    genai = client.create_experiment("genai", tags={"mlflow.experimentKind": "genai_development"})
    for name in ("plain", "genai"):
        monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", name)
        working_experiment()
    assert client.get_experiment(plain).tags["mlflow.experimentKind"] == "custom_model_development"
    assert client.get_experiment(genai).tags["mlflow.experimentKind"] == "genai_development"


def test_the_option_wins_over_the_environment_which_wins_over_the_default(clean_environment, monkeypatch):
    client = MlflowClient()
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "from-env")
    with parent_run(run_name="by-env") as by_env:
        pass
    with parent_run(run_name="by-option", experiment="from-option") as by_option:
        pass
    assert (experiment_of(by_env), experiment_of(by_option)) == ("from-env", "from-option")
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME")
    chosen = client.create_experiment("by-id")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", chosen)
    assert working_experiment() == chosen
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "from-env")
    with pytest.raises(ParameterError, match="MLFLOW_EXPERIMENT_ID"):
        working_experiment()  # both set and disagreeing: MLflow's own rule refuses it too


def test_a_run_already_made_keeps_its_experiment_and_refuses_another(clean_environment, monkeypatch):
    """As `mlflow run --experiment-name X` leaves it: MLFLOW_RUN_ID of a run in X."""
    client = MlflowClient()
    chosen = client.create_experiment("chosen-by-mlflow-run")
    project_run = client.create_run(chosen)
    monkeypatch.setenv("MLFLOW_RUN_ID", project_run.info.run_id)
    assert working_experiment() == chosen
    assert working_experiment("chosen-by-mlflow-run") == chosen
    with pytest.raises(ParameterError, match="--experiment-name"):
        working_experiment("another")
    with parent_run(run_name="resumed") as resumed, parent_run(run_name="child", nested=True) as child:
        pass
    assert resumed.info.run_id == project_run.info.run_id
    assert child.info.experiment_id == chosen


def fake_net(experiment_id: str) -> str:
    """A run with what the zoo query reads of a net (no artifact: the query does not open it)."""
    client = MlflowClient()
    tags = {
        TAG_ROLE: "net",
        TAG_SNAPSHOTS: SNAPSHOTS_COMPLETE,
        TAG_WEIGHTS_SHAPE: "2x10",
        TAG_WEIGHTS_DIGEST: "0",
    }
    run = client.create_run(experiment_id, tags=tags)
    for name in PROPERTY_NAMES:
        client.log_param(run.info.run_id, name, "1")
    client.log_metric(run.info.run_id, "weightn_conv", 4)
    client.log_metric(run.info.run_id, "weightn_fc", 6)
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def test_a_selection_looks_in_the_working_experiment_unless_told(clean_environment, monkeypatch):
    client = MlflowClient()
    in_nws = fake_net(working_experiment())
    elsewhere = fake_net(client.create_experiment("elsewhere"))
    assert list(Selection().query()["run_id"]) == [in_nws]
    assert list(Selection(experiment="elsewhere").query()["run_id"]) == [elsewhere]
    assert sorted(Selection(experiment="*").query()["run_id"]) == sorted([in_nws, elsewhere])
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "elsewhere")
    assert list(Selection().query()["run_id"]) == [elsewhere]
    with pytest.raises(ParameterError, match="experiment: no MLflow experiment named 'nothing'"):
        Selection(experiment="nothing").query()
    assert mlflow.active_run() is None
