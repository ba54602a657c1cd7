"""Meta-classifiers end to end: training on a run query, real learning, the results in MLflow,
the registry's champion alias, pyfunc loading, `predict`, and bad input."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from nws.commands.predict import PredictOptions, run_predict
from nws.commands.train import TrainOptions, run_training
from nws.meta.dmc import build_dmc, conv_plan
from nws.registry.registration import CHAMPION, registered_name
from nws.tracking.tags import TAG_ROLE, WEIGHTS_ARTIFACT
from tests.conftest import NO_TENSORFLOW

PLAIN = "params.initialization != 'glorot_uniform' and params.initialization != 'glorot_normal'"
"""Constant vs normal(0, 1) initialisation: plainly encoded in snapshot 1."""


def test_dmc_depth_follows_the_slice_length():
    model = build_dmc(5000, 5)
    assert model.get_layer("flatten").output.shape[1] == 19 * 256  # as in the paper
    assert 9e6 < model.count_params() < 11e6  # "about 10 M parameters at L = 5,000"
    assert len(conv_plan(50000)) > len(conv_plan(5000))
    assert build_dmc(64, 2).get_layer("flatten").output.shape[1] <= 256 * 8


def test_the_dmc_stream_trains_each_epoch_on_new_batches_made_in_order():
    """`backend.made_batches` (the DMC's training stream, tf.data here): batch i is `make(i)`
    exactly, and `fit` over 3 epochs of 2 steps trains on batches 0..5 in order. Keras'
    PyDataset of the whole stream gave 0, 1 in every epoch."""
    import keras

    from nws import backend

    def make(index: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(index)
        x = rng.standard_normal((4, 7), dtype=np.float32)
        x[:, 0] = index
        return x, rng.integers(0, 3, 4)

    batches = [tuple(np.asarray(part) for part in batch) for batch in backend.made_batches(make, 1, 5)]
    assert len(batches) == 5
    for index, (x, y) in enumerate(batches):
        want_x, want_y = make(index)
        assert x.dtype == np.float32 and y.dtype == want_y.dtype and x.shape == (4, 7)
        np.testing.assert_array_equal(x, want_x)
        np.testing.assert_array_equal(y, want_y)

    trained_on = []

    class Seen(keras.layers.Layer):
        def call(self, x):
            trained_on.append(int(keras.ops.convert_to_numpy(x)[0, 0]))
            return x

    model = keras.Sequential([keras.Input((7,)), Seen(), keras.layers.Dense(3)])
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True), run_eagerly=True)
    model.fit(backend.made_batches(make, 3, 2), epochs=3, steps_per_epoch=2, verbose=0, shuffle=False)
    assert trained_on == [0, 1, 2, 3, 4, 5]


@pytest.fixture(scope="module")
def learned(meta_zoo, tmp_path_factory):
    """Train once for this module: constant vs normal initialisation at snapshot 1, and the
    learning rate, with both slice models; registered in a fresh registry."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", meta_zoo.tracking_uri)
        patch.setenv("NWS_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        patch.chdir(meta_zoo.root)
        mlflow.set_tracking_uri(meta_zoo.tracking_uri)
        client = MlflowClient()
        for model in client.search_registered_models():
            client.delete_registered_model(model.name)
        options = TrainOptions(
            filter=PLAIN, props="initialization,lrate", K="1,1", slice_length=128, models="dmc,stats",
            steps=60, validate_every=20, batch_size=16, test_fraction=0.3, seed=1,
        )  # fmt: skip
        table = run_training(options)
        yield table[table["property"] == "initialization"].set_index("model"), table
        mlflow.set_tracking_uri(None)


def test_both_models_learn_a_plainly_encoded_property_far_above_chance(learned):
    """The positive control: the initialisation is written in every slice of snapshot 1."""
    initialization, _ = learned
    for model in ("dmc", "stats"):
        row = initialization.loc[model]
        assert row["chance"] == 0.5
        assert row["net_accuracy"] == 1.0, model
        assert row["slice_accuracy"] >= 0.9, model


def test_the_dmc_stays_at_chance_where_nothing_is_encoded(meta_zoo, monkeypatch, tmp_path):
    """The negative control: nets never trained (max_epochs=0) carry their optimizer in no
    weight; a DMC with the same budget as the positive control finds nothing."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", meta_zoo.tracking_uri)
    monkeypatch.setenv("NWS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(meta_zoo.root)
    mlflow.set_tracking_uri(meta_zoo.tracking_uri)
    try:
        options = TrainOptions(props="optimizer", K="1,1", slice_length=128, models="dmc", steps=60,
                               validate_every=20, batch_size=16, test_fraction=0.3, seed=1,
                               register=False)  # fmt: skip
        row = run_training(options).iloc[0]
    finally:
        mlflow.set_tracking_uri(None)
    assert row["chance"] == pytest.approx(1 / 3)
    assert row["pvalue"] > 0.05 and not row["significant"], (row["net_accuracy"], row["pvalue"])


def test_learning_rate_is_regressed_in_its_units(learned):
    _, table = learned
    lrate = table[table["property"] == "lrate"].set_index("model")
    for model in ("dmc", "stats"):
        assert 0 < lrate.loc[model, "net_mae"] < 0.005  # the space's range is [0.0002, 0.005]
        assert lrate.loc[model, "constant_guess_mae"] > 0
        assert np.isnan(lrate.loc[model, "chance"])
    champion = MlflowClient().get_model_version_by_alias(registered_name("lrate"), CHAMPION)
    assert champion.tags["nws.score_metric"] == "net_mae"


def test_results_reach_mlflow_and_the_champion_is_registered(learned):
    initialization, _ = learned
    client = MlflowClient()
    stats_run = mlflow.get_run(initialization.loc["stats", "run_id"])
    assert stats_run.data.tags[TAG_ROLE] == "meta-classifier"
    assert stats_run.data.params["classes"] == "constant,normal"
    assert stats_run.data.metrics["net_accuracy"] == 1.0
    artifacts = {a.path for a in client.list_artifacts(stats_run.info.run_id)}
    assert {"per_net.csv", "confusion.png", "position_sweep.npy", "position_sweep.png"} <= artifacts
    sweep = np.load(mlflow.artifacts.download_artifacts(run_id=stats_run.info.run_id,
                                                        artifact_path="position_sweep.npy"))  # fmt: skip
    assert sweep.shape[1:] == (100, 2)
    by_k = client.get_metric_history(stats_run.info.run_id, "accuracy_by_snapshot")
    assert [m.step for m in by_k] == [1]
    parent = mlflow.get_run(stats_run.data.tags["mlflow.parentRunId"])
    assert parent.data.tags[TAG_ROLE] == "meta"
    assert parent.data.metrics["netacc_initialization_stats"] == 1.0
    assert "mae_lrate_dmc" in parent.data.metrics and "mae_lrate_constant" in parent.data.metrics
    assert parent.data.metrics["chance_initialization"] == 0.5
    parent_artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"selection.csv", "results.csv", "results.png"} <= parent_artifacts
    selection = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=parent.info.run_id,
                                                                artifact_path="selection.csv"))  # fmt: skip
    parts = selection["split_initialization"].value_counts()
    assert parts["test"] >= 2 and parts["train"] >= 2
    name = registered_name("initialization")
    champion = client.get_model_version_by_alias(name, CHAMPION)
    assert champion.tags["nws.score_metric"] == "net_accuracy"
    assert float(champion.tags["nws.score"]) == 1.0


def test_each_net_and_meta_run_names_its_training_data_as_an_mlflow_dataset(learned):
    """The UI's Dataset column: a net's image dataset (one entity per dataset, shared by its
    nets, with what the net drew in the input's tags), and the zoo a meta run learned from, on
    the parent run, every child and the logged model's scores."""
    _, table = learned
    client = MlflowClient()
    everywhere = {"search_all_experiments": True, "output_format": "list"}
    nets = mlflow.search_runs(filter_string=f"tags.`{TAG_ROLE}` = 'net'", **everywhere)
    assert len(nets) >= 30
    digests: dict[str, set[str]] = {}
    for net in nets:
        (entry,) = net.inputs.dataset_inputs
        tags = {tag.key: tag.value for tag in entry.tags}
        assert entry.dataset.name == net.data.params["dataset"]
        assert tags["mlflow.data.context"] == "training"
        assert tags["nws.n_train"] == net.data.params["n_train"]
        assert tags["nws.split_seed"] == net.data.tags["nws.seed"]
        assert json.loads(entry.dataset.source)["tags"]["nws.source"] == "offline"
        digests.setdefault(entry.dataset.name, set()).add(entry.dataset.digest)
    assert len(digests) >= 2 and all(len(d) == 1 for d in digests.values())  # one entity per dataset
    name = next(iter(digests))
    on_it = mlflow.search_runs(filter_string=f"dataset.name = '{name}'", **everywhere)
    assert {r.info.run_id for r in on_it} == {n.info.run_id for n in nets if n.data.params["dataset"] == name}

    children = [mlflow.get_run(run_id) for run_id in table["run_id"]]
    parent = mlflow.get_run(children[0].data.tags["mlflow.parentRunId"])
    zoos = {(e.dataset.name, e.dataset.digest) for r in [parent, *children] for e in r.inputs.dataset_inputs}
    assert len(zoos) == 1
    ((zoo_name, zoo_digest),) = zoos
    assert zoo_name.startswith("zoo ") and len(zoo_digest) == 32
    (model,) = client.search_logged_models(
        experiment_ids=[children[0].info.experiment_id],
        filter_string=f"source_run_id = '{children[0].info.run_id}'",
    )
    scores = {m.key: m for m in model.metrics}
    row = table.set_index("run_id").loc[children[0].info.run_id]
    assert scores["net_accuracy"].value == pytest.approx(row["net_accuracy"])
    assert scores["net_accuracy"].dataset_digest == zoo_digest
    registered = json.loads(model.tags["mlflow.modelVersions"])
    version = int(row["registered"].split(" v")[1])
    assert registered == [{"name": registered_name(row["property"]), "version": version}]
    assert children[0].data.metrics["net_accuracy"] == pytest.approx(row["net_accuracy"])


def test_a_worse_model_does_not_take_the_champion_alias(learned):
    client = MlflowClient()
    name = registered_name("initialization")
    before = client.get_model_version_by_alias(name, CHAMPION)
    worse = TrainOptions(filter=PLAIN, props="initialization", K="1,1", slice_length=128,
                         models="dmc", steps=1, batch_size=16, test_fraction=0.3, seed=1,
                         learning_rate=1e-9)  # fmt: skip
    table = run_training(worse)
    after = client.get_model_version_by_alias(name, CHAMPION)
    assert after.version == before.version
    newest = max(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))
    assert newest.version != before.version
    assert not table["champion"].iloc[0]
    assert f"champion v{before.version}" in newest.tags["nws.champion_comparison"]


def test_registered_model_loads_as_pyfunc_and_predicts_readable_labels(learned, tmp_path):
    model = mlflow.pyfunc.load_model(f"models:/{registered_name('initialization')}@{CHAMPION}")
    assert model.metadata.signature is not None
    nets = mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string=f"tags.`nws.role` = 'net' and {PLAIN}")  # fmt: skip
    for run in nets[:4]:
        path = mlflow.artifacts.download_artifacts(
            run_id=run.info.run_id, dst_path=str(tmp_path / run.info.run_id),
            artifact_path=WEIGHTS_ARTIFACT,
        )  # fmt: skip
        weights = np.load(path)
        predicted = model.predict(weights[:1])
        assert predicted.tolist() == [run.data.params["initialization"]]


def test_predict_prints_and_logs_each_property_beside_the_truth(learned, capsys):
    normal = "tags.`nws.role` = 'net' and params.initialization = 'normal'"
    run = mlflow.search_runs(search_all_experiments=True, output_format="list", filter_string=normal)[0]
    table = run_predict(PredictOptions(run_id=run.info.run_id, k=1))
    assert table.set_index("property").loc["initialization", "predicted"] == "normal"
    assert table.set_index("property").loc["initialization", "true"] == "normal"
    out = capsys.readouterr().out
    assert "initialization  normal" in out and "(true: normal)" in out
    assert "dataset: no models:/nws-meta-dataset@champion, skipped" in out
    logged = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                filter_string="tags.`nws.role` = 'prediction'")  # fmt: skip
    assert logged[0].data.params["predicted_initialization"] == "normal"
    assert logged[0].data.metrics["correct_properties"] == 1


@pytest.mark.parametrize("case", ["nan", "inf", "length", "strings", "empty"])
def test_predict_refuses_a_snapshot_it_cannot_read_as_weights(learned, tmp_path, capsys, case):
    from nws.cli import main

    n_weights = 92868  # the fixed architecture of the zoo the champions learned from
    weights = np.random.default_rng(0).standard_normal((2, n_weights)).astype(np.float32)
    if case == "nan":
        weights[1, 7] = np.nan
    elif case == "inf":
        weights[1, 7] = np.inf
    elif case == "length":
        weights = weights[:, :-1]
    elif case == "strings":
        weights = weights.astype(str)
    elif case == "empty":
        weights = weights[:0]
    path = tmp_path / "weights.npy"
    np.save(path, weights)
    before = len(mlflow.search_runs(search_all_experiments=True, output_format="list",
                                    filter_string="tags.`nws.role` = 'prediction'"))  # fmt: skip
    capsys.readouterr()
    assert main(["predict", "--snapshot", str(path)]) == 2
    captured = capsys.readouterr()
    expected = {
        "nan": "holds NaN or infinite weights",
        "inf": "holds NaN or infinite weights",
        "length": f"{n_weights - 1} weights fit no architecture of the NWS space",
        "strings": "holds <U",
        "empty": "holds no snapshot",
    }[case]
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"nws predict: error: snapshot: {path}"), lines
    assert expected in lines[0], lines
    assert captured.out == ""  # no prediction printed
    after = mlflow.search_runs(search_all_experiments=True, output_format="list",
                               filter_string="tags.`nws.role` = 'prediction'")  # fmt: skip
    assert len(after) == before


JAX_TRAIN = (
    NO_TENSORFLOW
    + """
import json
import mlflow, numpy as np
from nws.commands.train import TrainOptions, run_training
from nws.registry.registration import CHAMPION, registered_name

options = TrainOptions(**json.loads(sys.argv[1]))
table = run_training(options)
champion = mlflow.pyfunc.load_model(f"models:/{registered_name('initialization')}@{CHAMPION}")
weights = np.load(sys.argv[2])
print(json.dumps({
    "rows": table[["property", "model", "net_accuracy", "net_mae"]].to_dict("records"),
    "tags": mlflow.get_run(table["run_id"].iloc[0]).data.tags,
    "predicted": champion.predict(weights[:1]).tolist(),
    "keras_backend": __import__("keras").backend.backend(),
    "tensorflow_imported": "tensorflow" in sys.modules,
}))
"""
)


def test_train_runs_on_jax_without_tensorflow_and_a_tensorflow_model_predicts_there(learned, tmp_path):
    """`train --backend jax` on a machine where TensorFlow cannot be imported: the statistics
    models give the TensorFlow run's figures exactly, the DMC passes the same positive control,
    and the champion registered from TensorFlow loads and predicts on JAX."""
    import json
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    initialization, table = learned
    options = {"experiment": "nws", "filter": PLAIN, "props": "initialization,lrate", "K": "1,1",
               "slice_length": 128, "models": "dmc,stats", "steps": 60, "validate_every": 20,
               "batch_size": 16, "test_fraction": 0.3, "seed": 1, "register": False,
               "backend": "jax"}  # fmt: skip
    net = mlflow.search_runs(search_all_experiments=True, output_format="list",
                             filter_string=f"tags.`nws.role` = 'net' and {PLAIN}")[0]  # fmt: skip
    weights = mlflow.artifacts.download_artifacts(run_id=net.info.run_id, artifact_path=WEIGHTS_ARTIFACT,
                                                  dst_path=str(tmp_path))  # fmt: skip
    env = {
        **os.environ,
        "KERAS_BACKEND": "jax",
        "PYTHONPATH": str(ROOT),
        "MLFLOW_EXPERIMENT_NAME": "jax-train",
    }
    done = subprocess.run([sys.executable, "-c", JAX_TRAIN, json.dumps(options), weights], env=env,
                          capture_output=True, text=True, timeout=900, cwd=os.getcwd())  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["keras_backend"] == "jax" and result["tensorflow_imported"] is False
    assert result["tags"]["nws.backend"] == "jax"
    on_jax = {(r["property"], r["model"]): r for r in result["rows"]}
    on_tf = {(r["property"], r["model"]): r for r in table.to_dict("records")}
    assert (
        on_jax[("initialization", "stats")]["net_accuracy"]
        == on_tf[("initialization", "stats")]["net_accuracy"]
    )
    assert on_jax[("lrate", "stats")]["net_mae"] == pytest.approx(
        on_tf[("lrate", "stats")]["net_mae"], rel=1e-9
    )
    assert (
        on_jax[("initialization", "dmc")]["net_accuracy"] == 1.0 == initialization.loc["dmc", "net_accuracy"]
    )
    assert 0 < on_jax[("lrate", "dmc")]["net_mae"] < 0.005
    assert result["predicted"] == [net.data.params["initialization"]]
