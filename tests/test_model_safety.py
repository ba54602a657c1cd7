"""Loading a meta-classifier runs no code from its data files.

A registered model's data files (`meta.json`, the gradient-boosting estimator, the DMC's `.keras`
archive) can be replaced by anyone who may write the artifact store. Each test puts a crafted
pickle (or a code-bearing Keras layer) where a data file was, loads the model the ways `nws` and
its users do, and checks that the load fails with one line and that the payload never ran: it
would have created a marker file. The models are tiny, fitted on random arrays.
"""

from __future__ import annotations

import copy
import pickle
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import mlflow
import numpy as np
import pytest
import skops.io
import yaml

from nws import meta
from nws.cli import main
from nws.errors import DataError
from nws.meta import create
from nws.meta.base import MetaClassifier, MetaSettings, Task
from nws.meta.baselines import TRUSTED_TYPES, _estimator
from nws.meta.features import slice_statistics
from nws.net.snapshots import weight_layout
from nws.registry.registration import load_champion, log_meta_classifier, registered_name
from nws.space import NetConfig

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = MetaSettings(slice_length=64, epochs=1, seed=0)
CLASSES = Task("initialization", ("constant", "normal"))
LAYOUT = weight_layout(NetConfig.parse("shapes,0.002,32,1,1,0,0,2,3,3,2,4,64"))
KINDS = ("dmc", "dmc_regression", "stats", "stats_regression", "layer_stats")
REGISTERED_AS = {"dmc": "initialization", "stats": "optimizer", "layer_stats": "activation"}


class Payload:
    """A pickle that creates `marker` when it is unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def fit_quickly(model: MetaClassifier, features: np.ndarray, targets: np.ndarray) -> None:
    """`_fit_features` with 20 boosting iterations instead of 300: the file holds the same types."""
    regression = model.task.is_regression
    model.estimator = _estimator(regression, 0, len(features)).set_params(max_iter=20)
    model.estimator.fit(features, model.task.scale(targets) if regression else targets)


def fitted(kind: str) -> MetaClassifier:
    """A model of `kind` fitted on random arrays (the DMC untrained: its file is what matters)."""
    rng = np.random.default_rng(0)
    labels = np.arange(60) % 2
    if kind in ("dmc", "dmc_regression"):
        model = create("dmc", Task("lrate") if kind == "dmc_regression" else CLASSES, SETTINGS)
        model._compile()
    elif kind in ("stats", "stats_regression"):
        task = Task("lrate") if kind == "stats_regression" else CLASSES
        model = create("stats", task, SETTINGS)
        slices = rng.normal(size=(60, SETTINGS.slice_length)) * (1 + labels[:, None])
        targets = rng.uniform(0.0002, 0.005, 60) if task.is_regression else labels
        fit_quickly(model, slice_statistics(slices), targets)
    else:
        model = create("layer_stats", CLASSES, SETTINGS, LAYOUT)
        vectors = rng.normal(size=(60, LAYOUT.n_weights)).astype(np.float32) * (1 + labels[:, None])
        fit_quickly(model, model._features(vectors), labels)
    return model


def outputs(model: MetaClassifier, vectors: np.ndarray) -> np.ndarray:
    return np.stack([model.predict_vector(v) for v in vectors])


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[MetaClassifier, Path]]:
    root = tmp_path_factory.mktemp("saved")
    made = {}
    for kind in KINDS:
        model = fitted(kind)
        model.save(root / kind)
        made[kind] = model, root / kind
    return made


def refusal(
    marker: Path, load: Callable[..., object], *args: object, expected: type[Exception] = DataError
) -> str:
    """Call `load(*args)`; the payload must not have run, whether or not the load failed. Return
    the message of the error it must have raised, one line."""
    try:
        load(*args)
    except Exception as e:
        error: Exception | None = e
    else:
        error = None
    assert not marker.exists(), "the crafted payload ran"
    assert isinstance(error, expected), f"expected {expected.__name__}, got {error!r}"
    message = str(error)
    assert message and "\n" not in message, message
    return message


def data_files(directory: Path) -> list[Path]:
    files = sorted((p for p in directory.rglob("*") if p.is_file()), key=lambda p: (p.name == "meta.json", p))
    assert len(files) == 2, files  # the estimator's file, then meta.json
    return files


@pytest.mark.parametrize("kind", KINDS)
def test_a_saved_model_reloads_and_predicts_as_before(saved, kind):
    model, directory = saved[kind]
    loaded = meta.load(directory)
    assert type(loaded) is type(model) and loaded.task == model.task
    if model.name != "dmc":  # the trusted-type list is exactly what skops does not trust by default
        assert skops.io.get_untrusted_types(file=directory / f"{model.name}.skops") == list(TRUSTED_TYPES)
    vectors = np.random.default_rng(1).normal(size=(3, LAYOUT.n_weights)).astype(np.float32)
    np.testing.assert_allclose(outputs(loaded, vectors), outputs(model, vectors), rtol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_a_pickle_in_place_of_any_data_file_is_refused_and_runs_nothing(saved, kind, tmp_path):
    _, directory = saved[kind]
    for original in data_files(directory):
        tampered = tmp_path / f"{kind}-{original.name}"
        shutil.copytree(directory, tampered)
        marker = tmp_path / f"ran-{original.name}"
        (tampered / original.name).write_bytes(pickle.dumps(Payload(marker)))
        assert original.name in refusal(marker, meta.load, tampered)


def test_a_model_saved_with_joblib_by_an_older_version_is_refused_with_a_line_to_retrain(saved, tmp_path):
    import joblib

    model, directory = saved["stats"]
    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(directory / "meta.json", old / "meta.json")
    joblib.dump(model.estimator, old / "stats.joblib")
    with pytest.raises(DataError, match="retrain") as error:
        meta.load(old)
    assert "\n" not in str(error.value)


def test_an_estimator_file_naming_a_type_outside_the_trusted_list_is_refused(saved, tmp_path):
    import os

    from sklearn.preprocessing import FunctionTransformer

    _, directory = saved["stats"]
    (estimator_file,) = [p for p in data_files(directory) if p.name != "meta.json"]
    for stranger in (FunctionTransformer(os.system), saved["stats_regression"][0].estimator):
        tampered = tmp_path / type(stranger).__name__
        shutil.copytree(directory, tampered)
        skops.io.dump(stranger, tampered / estimator_file.name)
        with pytest.raises(DataError) as error:
            meta.load(tampered)
        assert "\n" not in str(error.value)
        assert estimator_file.name in str(error.value)


def test_a_keras_file_holding_code_is_refused_even_with_unsafe_deserialization_switched_on(saved, tmp_path):
    import keras
    from keras.src.backend.common import global_state

    _, directory = saved["dmc"]
    marker = tmp_path / "ran-lambda"
    inputs = keras.Input((SETTINGS.slice_length,))
    # Keras stores a Lambda's bytecode; loading it in unsafe mode runs it while building the model.
    payload = eval(f"lambda x: (open({str(marker)!r}, 'w').close(), x)[1]")
    crafted = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Lambda(payload)(inputs)))
    tampered = tmp_path / "dmc"
    shutil.copytree(directory, tampered)
    crafted.save(tampered / "dmc.keras")
    marker.unlink()  # building the model above ran it once
    previous = global_state.get_global_attribute("safe_mode_saving")
    keras.config.enable_unsafe_deserialization()  # a process that opted in elsewhere
    try:
        assert "Lambda" in refusal(marker, meta.load, tampered)
    finally:
        global_state.set_global_attribute("safe_mode_saving", previous)


@pytest.fixture(scope="module")
def logged(saved, tmp_path_factory):
    """Each kind logged, registered and made champion in a fresh store (module scope: logging is
    the slow part); yields (kind, registered property, logged model id, its local directory)."""
    root = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.chdir(root)
        mlflow.set_tracking_uri(uri)
        models = []
        for kind, prop in REGISTERED_AS.items():
            model = copy.copy(saved[kind][0])
            model.task = Task(prop, CLASSES.classes)  # a registered name of its own
            with mlflow.start_run():
                registration = log_meta_classifier(model, True, 1.0, "net_accuracy", True)
            assert registration is not None and registration.champion
            model_id = registration.model_uri.removeprefix("models:/")
            location = mlflow.get_logged_model(model_id).artifact_location
            directory = Path(location.removeprefix("file://"))
            assert (directory / "MLmodel").is_file()
            models.append((kind, model.task.prop, model_id, directory))
        yield models
        mlflow.set_tracking_uri(None)


def test_a_logged_model_with_a_pickle_for_a_data_file_is_refused_by_pyfunc_registry_and_cli(
    logged, tmp_path, capsys
):
    snapshot = tmp_path / "weights.npy"
    np.save(snapshot, np.zeros(LAYOUT.n_weights, np.float32))

    def predict(prop: str) -> None:
        """`nws predict`, in this process; raises what it prints, so that `refusal` can check it."""
        code = main(["predict", "--snapshot", str(snapshot), "--props", prop])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and err.startswith("nws predict: error: cannot load"), err
        raise DataError(err.strip())

    for kind, prop, _, directory in logged:
        assert load_champion(prop) is not None  # untouched, it loads
        for original in data_files(directory / "artifacts" / "meta"):
            kept = original.read_bytes()
            marker = tmp_path / f"ran-{kind}-{original.name}"
            original.write_bytes(pickle.dumps(Payload(marker)))
            try:
                uri = f"models:/{registered_name(prop)}@champion"
                assert original.name in refusal(marker, mlflow.pyfunc.load_model, uri, expected=Exception)
                assert original.name in refusal(marker, load_champion, prop)
                assert original.name in refusal(marker, predict, prop)
            finally:
                original.write_bytes(kept)


def string_values(node: object) -> Iterator[str]:
    """Every string in a parsed YAML document."""
    if isinstance(node, dict):
        node = list(node.values())
    if isinstance(node, list):
        for value in node:
            yield from string_values(value)
    elif isinstance(node, str):
        yield node


def test_a_logged_model_names_no_local_path(logged):
    local = {tempfile.gettempdir(), str(ROOT), str(Path.home()), sys.prefix}
    for _, _, model_id, directory in logged:
        location = mlflow.get_logged_model(model_id).artifact_location
        mlmodel = yaml.safe_load((directory / "MLmodel").read_text())
        # The store's own location of the model: local only because this test's store is.
        assert mlmodel.pop("artifact_path") == location
        texts = [yaml.safe_dump(mlmodel)] + [
            (directory / name).read_text() for name in ("requirements.txt", "conda.yaml", "python_env.yaml")
        ]
        for text in texts:
            for path in local:
                assert path not in text, (path, text)
        strings = list(string_values(mlmodel))
        assert not [s for s in strings if s.startswith(("/", "file:"))], strings
        assert mlmodel["flavors"]["python_function"]["model_code_path"] == "pyfunc_model.py"
