"""Shared fixtures: a temporary SQLite MLflow store per test, TensorFlow configured once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _tensorflow() -> None:
    from nws.training import configure_tensorflow

    configure_tensorflow(deterministic=True)


@pytest.fixture
def tracking_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh SQLite tracking store (and artifact root) for one test."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(uri)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


class Zoo:
    """A tiny campaign sampled once per session with the real `sample` entry point."""

    def __init__(self, root: Path, tracking_uri: str, storage: str, parameters: dict[str, str]):
        self.root = root
        self.tracking_uri = tracking_uri
        self.storage = storage
        self.parameters = parameters
        self.project_run_id = ""


ZOO_PARAMETERS = {
    "n_nets": "3",
    "subset": "main",
    "datasets": "digits,shapes",
    "prints": "4",
    "max_epochs": "2",
    "min_epochs": "1",
    "max_train_images": "150",
    "max_eval_images": "60",
    "seed": "1",
    "campaign": "e2e",
}


@pytest.fixture(scope="session")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Zoo:
    import mlflow
    import mlflow.projects

    root = tmp_path_factory.mktemp("zoo")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    storage = str(root / "optuna.log")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.chdir(root)
        mlflow.set_tracking_uri(uri)
        submitted = mlflow.projects.run(
            str(ROOT),
            entry_point="sample",
            parameters={**ZOO_PARAMETERS, "storage": storage},
            env_manager="local",
            synchronous=True,
        )
        mlflow.set_tracking_uri(None)
    made = Zoo(root, uri, storage, ZOO_PARAMETERS)
    made.project_run_id = submitted.run_id
    return made


@pytest.fixture
def in_zoo(zoo: Zoo, monkeypatch: pytest.MonkeyPatch) -> Zoo:
    """Point MLflow at the session's zoo for one test."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", zoo.tracking_uri)
    monkeypatch.chdir(zoo.root)
    mlflow.set_tracking_uri(zoo.tracking_uri)
    yield zoo
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)
