"""The permutation-invariant meta-classifier (nws.meta.invariant) on a tiny zoo of real Keras nets
of two architectures, read through a real zoo store and real `Samples`."""

from __future__ import annotations

import io
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from nws.errors import DataError
from nws.meta.base import MetaSettings, Task
from nws.meta.invariant import MODEL_FILE, InvariantModel
from nws.meta.samples import Samples
from nws.meta.unit_features import SLOTS, UnitTable, max_units, template
from nws.net.snapshots import architecture_for_length, conv_size_for_length, weight_layout
from nws.net.symmetry import permute
from nws.space import NetConfig
from nws.zoo.store import Zoo

ARCHITECTURES = ((3, 3, 2, 4, 64), (5, 4, 3, 8, 64))  # filter, depth conv / fc, width conv / fc
INITIALIZATIONS = ("constant", "normal")
SEEDS = 6  # per architecture and initialisation: nets 0-2 train, 3 validate, 4-5 test
SETTINGS = MetaSettings(epochs=15, batch_size=8, seed=0)


def config(architecture: tuple[int, ...], initialization: str) -> NetConfig:
    return NetConfig("digits", 0.001, 32, "on", "off", "adam", "relu", initialization, *architecture)


@pytest.fixture(scope="module")
def nets() -> pd.DataFrame:
    """One row per net: its architecture, initialisation, seed and initial flat vector (what
    snapshot 1 of a `clean` net is), built with `nws.net.cnn.build_model`."""
    import keras

    from nws.net.cnn import build_model
    from nws.net.snapshots import flatten

    rows = []
    for seed in range(SEEDS):
        for a, architecture in enumerate(ARCHITECTURES):
            for label, initialization in enumerate(INITIALIZATIONS):
                keras.utils.set_random_seed(seed)
                net = config(architecture, initialization)
                vector = flatten(build_model(net), weight_layout(net))
                rows.append({"architecture": a, "label": label, "seed": seed, "vector": vector})
    return pd.DataFrame(rows)


def write_zoo(directory: Path, vectors: list[np.ndarray]) -> Zoo:
    """A zoo store of one snapshot per net, in the format `build_zoo` writes."""
    rows, offset = [], 0
    for i, vector in enumerate(vectors):
        path = directory / f"net{i}.npy"
        np.save(path, vector[None])
        with open(path, "rb") as f:
            np.lib.format.read_magic(f)
            np.lib.format.read_array_header_1_0(f)
            data_offset = f.tell()
        rows.append({"run_id": f"{i:032x}", "offset": offset, "n_weights": len(vector),
                     "weightn_conv": conv_size_for_length(len(vector)), "prints": 1,
                     "data_offset": data_offset, "path": str(path), "test_accuracy": 0.5})  # fmt: skip
        offset += len(vector)
    return Zoo(directory, pd.DataFrame(rows).to_csv(index=False))


@pytest.fixture(scope="module")
def fitted(nets, tmp_path_factory) -> tuple[InvariantModel, Samples]:
    """A model fitted on the zoo's training nets (both architectures) to tell the initialisation
    from snapshot 1; returns it and the test samples."""
    zoo = write_zoo(tmp_path_factory.mktemp("zoo"), list(nets["vector"]))
    labels = nets["label"].to_numpy()

    def samples(seeds: range) -> Samples:
        chosen = np.flatnonzero(nets["seed"].isin(seeds))
        return Samples.of(zoo, chosen, labels, (1, 1), "all", 1)

    model = InvariantModel(Task("initialization", INITIALIZATIONS), SETTINGS)
    model.fit(samples(range(3)), samples(range(3, 4)))
    return model, samples(range(4, SEEDS))


def test_the_architecture_is_known_from_the_length_alone() -> None:
    for architecture in ARCHITECTURES:
        net = config(architecture, "normal")
        found = architecture_for_length(weight_layout(net).n_weights)
        assert (found.filter_size, found.depth_conv, found.depth_fc, found.width_conv, found.width_fc) == (
            architecture
        )
        assert found.batch_norm == "on"
        t = template(weight_layout(net).n_weights)
        assert t.n_units == sum(e.shape[-1] for e in weight_layout(net) if e.tensor == "kernel")
        used = sorted({layer.slot for layer in t.layers})
        assert np.allclose(t.layer_pool.sum(axis=1)[used], 1.0)  # a mean per layer
        assert np.allclose(np.delete(t.layer_pool.sum(axis=1), used), 0.0)
        assert np.allclose(t.role_pool.sum(axis=1), 1.0)  # every role present, a mean per role
    assert max_units() == 536 and SLOTS == 10  # depth 5 conv, width 12: 13 * 12 + 360 dense + 20
    with pytest.raises(ValueError, match="no architecture of the NWS space has 12345 weights"):
        architecture_for_length(12345)


def test_it_tells_the_initialisation_across_two_architectures(fitted, nets) -> None:
    model, test = fitted
    probabilities = model.predict_snapshots(
        [test.zoo.snapshot(n, k) for n, k in zip(test.net, test.k, strict=True)]
    )
    assert probabilities.shape == (8, 2)
    assert set(nets["architecture"].iloc[test.net]) == {0, 1}
    accuracy = (probabilities.argmax(axis=1) == test.label).mean()
    assert accuracy == 1.0  # chance: 0.5
    assert model.history["accuracy"][-1] == 1.0 and "val_loss" in model.history


def test_a_saved_model_loads_in_safe_mode_and_predicts_the_same(fitted, tmp_path) -> None:
    model, test = fitted
    vectors = [test.zoo.snapshot(n, k) for n, k in zip(test.net, test.k, strict=True)]
    model.save(tmp_path / "model")
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == [
        "invariant.json",
        MODEL_FILE,
        "meta.json",
    ]
    assert json.loads((tmp_path / "model" / "meta.json").read_text())["model"] == "invariant"
    loaded = reload(model, tmp_path / "model")
    assert np.abs(loaded.predict_snapshots(vectors) - model.predict_snapshots(vectors)).max() <= 1e-6


def reload(model: InvariantModel, directory: Path) -> InvariantModel:
    """What `MetaClassifier.load` does once `invariant` is one of the factory's names."""
    loaded = InvariantModel(model.task, model.settings)
    loaded._load_model(directory)
    return loaded


def test_the_output_is_unchanged_when_hidden_units_are_renumbered(nets) -> None:
    """A model trained one epoch on random labels, so its outputs are far from 0 and 1."""
    rng = np.random.default_rng(0)
    normal = nets[nets["label"] == 1]
    model = InvariantModel(Task("initialization", INITIALIZATIONS), MetaSettings(epochs=1, batch_size=4))
    model.fit_vectors(list(normal["vector"]), rng.integers(0, 2, len(normal)))
    originals = list(normal["vector"])
    permuted = [permute(v, weight_layout(config(ARCHITECTURES[a], "normal")), rng)
                for v, a in zip(originals, normal["architecture"], strict=True)]  # fmt: skip
    assert all(not np.array_equal(p, v) for p, v in zip(permuted, originals, strict=True))
    # the units reach the model in another order: the invariance is the model's, not the input's
    assert not np.array_equal(UnitTable.of(permuted).features, UnitTable.of(originals).features)
    before, after = model.predict_snapshots(originals), model.predict_snapshots(permuted)
    assert before[:, 0].std() > 1e-3 and (before > 0.02).all()  # outputs that vary with the net
    assert np.abs(after - before).max() <= 1e-5


def test_it_regresses_the_learning_rate(nets) -> None:
    """A synthetic property that every weight shows: each normal-initialised net rescaled by
    0.5 + 1.5 * (its learning rate scaled to [0, 1]); held out: the nets of seeds 4 and 5."""
    rng = np.random.default_rng(1)
    task = Task("lrate")
    normal = nets[nets["label"] == 1].loc[np.repeat(nets.index[nets["label"] == 1], 3)]
    rates = rng.uniform(0.0002, 0.005, len(normal))
    vectors = [
        v * np.float32(0.5 + 1.5 * s) for v, s in zip(normal["vector"], task.scale(rates), strict=True)
    ]
    train = (normal["seed"] < 4).to_numpy()
    model = InvariantModel(task, MetaSettings(epochs=30, batch_size=8, learning_rate=3e-3))
    model.fit_vectors([v for v, t in zip(vectors, train, strict=True) if t], rates[train])
    predicted = model.predict_snapshots([v for v, t in zip(vectors, train, strict=True) if not t])
    assert predicted.shape == (int((~train).sum()),)
    assert ((predicted >= 0.0002) & (predicted <= 0.005)).all()
    mae = np.abs(predicted - rates[~train]).mean()
    guess = np.abs(np.median(rates[train]) - rates[~train]).mean()
    assert mae < 0.5 * guess, (mae, guess)


def test_a_tampered_model_is_refused_before_anything_runs(fitted, tmp_path) -> None:
    model, _ = fitted
    model.save(tmp_path / "model")
    features = tmp_path / "bad-features"
    shutil.copytree(tmp_path / "model", features)
    (features / "invariant.json").write_text('{"format": "nws-invariant-features-v1", "mean": []}')
    with pytest.raises(DataError, match=r"^invariant.json: not an invariant model's features \(KeyError"):
        reload(model, features)

    archive = tmp_path / "bad-archive"
    shutil.copytree(tmp_path / "model", archive)
    with zipfile.ZipFile(tmp_path / "model" / MODEL_FILE) as original:
        parts = {name: original.read(name) for name in original.namelist()}
    config_json = json.loads(parts["config.json"])
    config_json["config"]["layers"].append({"module": "keras.layers", "class_name": "Lambda", "config": {}})
    parts["config.json"] = json.dumps(config_json).encode()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as tampered:
        for name, data in parts.items():
            tampered.writestr(name, data)
    (archive / MODEL_FILE).write_bytes(buffer.getvalue())
    with pytest.raises(
        DataError, match=r"names objects an invariant model is not made of: keras\.layers\.Lambda$"
    ):
        reload(model, archive)
