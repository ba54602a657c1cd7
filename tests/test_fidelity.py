"""Fidelity `paper` against `clean`: every semantic of the released code that `paper` reproduces,
pinned by a check that holds under `paper` and fails under `clean` (the README's section "How
close to the released code"), and the `fidelity` parameter end to end."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import keras
import mlflow
import numpy as np
import optuna
import pytest

from nws.campaign.storage import open_storage
from nws.commands.sample import SampleOptions, run_campaign
from nws.data import ImageSet, load_images, split_for_net
from nws.errors import DataError, ParameterError
from nws.meta.evaluation import paper_pairwise_mae
from nws.net.cnn import build_model
from nws.net.pipeline import TensorFlowStreams
from nws.net.snapshots import SnapshotRecorder, flatten, load_into, weight_layout
from nws.net.training import EarlyStopping, EvaluationSets, TrainSettings, make_optimizer, train_net
from nws.space import NetConfig

FIDELITIES = ("paper", "clean")
LR = 0.005
W0 = np.array([0.5, -0.25])
# The second parameter's gradient is tiny in the Adam case, where epsilon decides the step.
RMSPROP_GRADS = [np.array([0.1, -0.2]), np.array([0.3, 0.05])]
ADAM_GRADS = [np.array([0.1, -2e-6]), np.array([0.3, 1e-6])]
# A tiny net: filter 3, 3 conv / 2 fc layers, widths 4 / 64, batch 32, augmentation off.
TINY_TEXT = "mnist5k,0.002,32,1,0,0,0,2,3,3,2,4,64"
TINY = NetConfig.parse(TINY_TEXT)


def f32(x: float) -> float:
    """Hyper-parameters as both frameworks hold them: rounded to float32."""
    return float(np.float32(x))


def config_with(**changes) -> NetConfig:
    return dataclasses.replace(TINY, **changes)


def apply_steps(optimizer, grads) -> list[np.ndarray]:
    """The optimizer's parameters after each of `grads`, on a 2-parameter float32 variable."""
    variable = keras.Variable(W0.astype(np.float32))
    out = []
    for g in grads:
        optimizer.apply_gradients([(keras.ops.convert_to_tensor(g.astype(np.float32)), variable)])
        out.append(np.asarray(variable.numpy(), np.float64))
    return out


def hand_tf1_rmsprop(grads) -> list[np.ndarray]:
    """TF1's ApplyRMSProp kernel at RMSPropOptimizer's defaults: ms starts at 1, rho 0.9,
    momentum 0, epsilon 1e-10 inside the square root."""
    rho, lr = f32(0.9), f32(LR)
    w, ms, out = W0.copy(), np.ones(2), []
    for g in grads:
        ms = ms + (g * g - ms) * (1 - rho)
        w = w - lr * g / np.sqrt(ms + 1e-10)
        out.append(w.copy())
    return out


def hand_tf1_adam(grads) -> list[np.ndarray]:
    """TF1's ApplyAdam kernel at AdamOptimizer's defaults (epsilon 1e-8, added to sqrt(v)), with
    beta^t kept in float32 as TF1 does."""
    lr, b1, b2 = f32(LR), f32(0.9), f32(0.999)
    w, m, v, p1, p2, out = W0.copy(), np.zeros(2), np.zeros(2), b1, b2, []
    for g in grads:
        alpha = lr * np.sqrt(1 - p2) / (1 - p1)
        m = m + (g - m) * (1 - b1)
        v = v + (g * g - v) * (1 - b2)
        w = w - m * alpha / (np.sqrt(v) + 1e-8)
        p1, p2 = f32(p1 * b1), f32(p2 * b2)
        out.append(w.copy())
    return out


def largest_error(got, want) -> float:
    return max(float(np.max(np.abs(a - b))) for a, b in zip(got, want, strict=True))


# Row 1 -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fidelity", FIDELITIES)
def test_rmsprop_follows_tf1_under_paper_one_and_two_steps(fidelity):
    optimizer = make_optimizer(
        config_with(optimizer="rmsprop", lrate=LR), 1, TrainSettings(fidelity=fidelity)
    )
    got, want = apply_steps(optimizer, RMSPROP_GRADS), hand_tf1_rmsprop(RMSPROP_GRADS)
    if fidelity == "paper":
        assert largest_error(got[:1], want[:1]) < 1e-7 and largest_error(got, want) < 1e-7
    else:  # Keras starts the accumulator at 0: a first step 15-30x the TF1 one
        assert largest_error(got[:1], want[:1]) > 1e-3


def test_tf1_rmsprop_is_serializable_and_starts_its_accumulator_at_one():
    from nws.net.optimizers import TF1RMSprop

    optimizer = TF1RMSprop(0.003)
    again = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert type(again) is TF1RMSprop
    assert again.get_config()["epsilon"] == 1e-10 and again.get_config()["rho"] == 0.9
    assert again.get_config()["learning_rate"] == pytest.approx(0.003)
    variable = keras.Variable(np.zeros(3, np.float32))
    again.build([variable])
    rms = [v for v in again.variables if v.name.endswith("rms")]
    assert len(rms) == 1 and np.all(rms[0].numpy() == 1.0)


# Row 2 -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fidelity", FIDELITIES)
def test_adam_uses_tf1_epsilon_under_paper_one_and_two_steps(fidelity):
    optimizer = make_optimizer(config_with(optimizer="adam", lrate=LR), 1, TrainSettings(fidelity=fidelity))
    got, want = apply_steps(optimizer, ADAM_GRADS), hand_tf1_adam(ADAM_GRADS)
    if fidelity == "paper":
        assert largest_error(got[:1], want[:1]) < 1e-7 and largest_error(got, want) < 1e-7
    else:  # epsilon 1e-7: the small gradient's step is lr/4.16 instead of lr/1.32
        assert largest_error(got[:1], want[:1]) > 1e-3


def test_momentum_is_the_same_under_both_fidelities():
    config = config_with(optimizer="momentum", lrate=LR)
    paper, clean = (apply_steps(make_optimizer(config, 1, TrainSettings(fidelity=f)), RMSPROP_GRADS)
                    for f in FIDELITIES)  # fmt: skip
    np.testing.assert_array_equal(paper, clean)


# Rows 3 and 6 ------------------------------------------------------------------------------------


def bn_layers(model):
    return [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]


@pytest.mark.parametrize("fidelity", FIDELITIES)
def test_evaluation_uses_batch_statistics_and_updates_moving_statistics_under_paper(fidelity):
    keras.utils.set_random_seed(0)
    model = build_model(TINY, fidelity=fidelity)
    images = np.random.default_rng(0).uniform(size=(16, 32, 32, 3)).astype(np.float32)
    alone = model.predict(images[:8], batch_size=8, verbose=0)
    again = model.predict(images[:8], batch_size=8, verbose=0)
    np.testing.assert_array_equal(alone, again)  # dropout is off at evaluation, under both
    mixed = model.predict(np.concatenate([images[:1], images[8:15]]), batch_size=8, verbose=0)
    moved = [float(np.abs(layer.moving_mean.numpy()).max()) for layer in bn_layers(model)]
    if fidelity == "paper":  # image 0's output depends on the batch it is in
        assert np.abs(alone[0] - mixed[0]).max() > 1e-4
        assert min(moved) > 0  # three predict batches moved every layer's statistics
    else:
        np.testing.assert_allclose(alone[0], mixed[0], rtol=1e-5, atol=1e-6)
        assert max(moved) == 0.0


@pytest.mark.parametrize("fidelity", FIDELITIES)
def test_batch_norm_gamma_is_drawn_from_n_1_0002_under_paper(fidelity):
    keras.utils.set_random_seed(0)
    layers = bn_layers(build_model(TINY, fidelity=fidelity))
    gammas = np.concatenate([layer.gamma.numpy() for layer in layers])
    assert len(layers) == 5
    if fidelity == "paper":
        assert np.all(np.abs(gammas - 1) < 0.02) and len(np.unique(gammas)) == len(gammas)
        fc1 = next(layer for layer in layers if layer.name == "fc1_bn").gamma.numpy()
        assert len(fc1) == 64 and 0.001 <= fc1.std() <= 0.004
    else:
        assert np.all(gammas == 1.0)


def dataset_batches(ds) -> list[np.ndarray]:
    return [np.asarray(x) for x, _ in ds]


@pytest.mark.parametrize("fidelity", FIDELITIES)
def test_evaluation_batches_have_the_nets_batch_size_under_paper(fidelity):
    x = np.random.default_rng(1).integers(0, 256, size=(100, 32, 32, 3), dtype=np.uint8)
    y = np.zeros(100, np.int64)
    data = split_for_net(load_images("digits"), 0, 64, 32)
    sets = EvaluationSets(TINY, data, 0, TrainSettings(fidelity=fidelity), TensorFlowStreams())
    sizes = [len(b) for b in dataset_batches(sets.of(x, y))]
    small = [len(b) for b in dataset_batches(sets.of(x[:20], y[:20]))]
    if fidelity == "paper":
        assert sizes == [32, 32, 32]  # the remainder of 4 is dropped, as the released code
        assert small == [20]  # smaller than one batch: one batch of all images
    else:
        assert sizes == [100] and small == [20]


# Row 4 -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fidelity", FIDELITIES)
def test_evaluation_images_are_augmented_under_paper(fidelity):
    data = split_for_net(load_images("digits"), 0, 64, 64)
    settings = TrainSettings(fidelity=fidelity)
    sets = EvaluationSets(config_with(augmentation="on"), data, 0, settings, TensorFlowStreams())
    ds = sets.of(data.x_valid, data.y_valid)
    first, second = dataset_batches(ds)[0], dataset_batches(ds)[0]
    clean = data.x_valid[: len(first)].astype(np.float32) / 255.0
    if fidelity == "paper":
        assert np.abs(first - clean).mean() > 0.01
        assert np.abs(first - second).mean() > 0.01  # every pass draws anew
        assert first.min() >= 0.0 and first.max() <= 1.0
    else:
        np.testing.assert_array_equal(first, clean)
        np.testing.assert_array_equal(first, second)


def test_evaluation_augmentation_has_its_own_seed_stream():
    from nws.net.pipeline import evaluation_augmenter_seed

    seeds = [evaluation_augmenter_seed(s) for s in range(50)]
    assert len(set(seeds)) == 50 and not set(seeds) & set(range(60))
    assert evaluation_augmenter_seed(7) == evaluation_augmenter_seed(7)


# Row 5 -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_data():
    return {f: split_for_net(load_images("mnist5k"), 3, 200, 150, fidelity=f) for f in FIDELITIES}


def snapshot_one(fidelity, data, seed=3):
    layout = weight_layout(TINY)
    settings = TrainSettings(max_epochs=0, min_epochs=0, fidelity=fidelity)
    with SnapshotRecorder(layout) as recorder:
        train_net(TINY, data, seed, settings, [recorder.record])
        weights, _ = recorder.select(2)
    return weights[0], layout


def expected_conv1_statistics(row, layout, data, seed):
    """Replay of the released order before export 1: the first training batch, then every full
    validation batch, then every full test batch, each a batch-norm forward whose moments move
    the statistics (momentum 0.9, biased variance, from 0 and 1)."""
    from nws.data import BalancedSampler

    model = build_model(TINY, fidelity="clean")
    load_into(model, row, layout)
    conv = keras.Model(model.input, model.get_layer("conv1_1").output)
    first = BalancedSampler(data.y_train, seed).epoch()[:32]
    batches = [data.x_train[first]]
    for x in (data.x_valid, data.x_test):
        batches += [x[i : i + 32] for i in range(0, len(x) - 31, 32)]
    mean, variance = np.zeros(4), np.ones(4)
    for batch in batches:
        out = np.asarray(conv(batch.astype(np.float32) / 255.0), np.float64)
        mean = 0.9 * mean + 0.1 * out.mean(axis=(0, 1, 2))
        variance = 0.9 * variance + 0.1 * out.var(axis=(0, 1, 2))
    return mean, variance, len(batches)


@pytest.mark.parametrize("fidelity", FIDELITIES)
def test_snapshot_one_holds_data_updated_moving_statistics_under_paper(fidelity, small_data):
    data = small_data[fidelity]
    row, layout = snapshot_one(fidelity, data)
    keras.utils.set_random_seed(3)
    initial = flatten(build_model(TINY, fidelity=fidelity), layout)
    stats = {"moving_mean", "moving_variance"}
    for entry in layout:  # trainable tensors: the initialisation, under both
        if entry.tensor not in stats:
            np.testing.assert_array_equal(row[entry.offset : entry.stop], initial[entry.offset : entry.stop])
    means = np.concatenate([row[e.offset : e.stop] for e in layout if e.tensor == "moving_mean"])
    variances = np.concatenate([row[e.offset : e.stop] for e in layout if e.tensor == "moving_variance"])
    mean1, var1 = (next(row[e.offset : e.stop] for e in layout if e.layer == "conv1_1" and e.tensor == t)
                   for t in ("moving_mean", "moving_variance"))  # fmt: skip
    if fidelity == "paper":
        # Every layer moved (a unit can stay at 0: a ReLU unit dead on every image).
        assert all(np.any(row[e.offset : e.stop] != 0) for e in layout if e.tensor == "moving_mean")
        assert np.all(variances != 1)
        want_mean, want_var, n_batches = expected_conv1_statistics(row, layout, data, 3)
        assert n_batches == 1 + 4 + 4  # 150 validation and 150 test images: 4 full batches each
        np.testing.assert_allclose(mean1, want_mean, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(var1, want_var, rtol=1e-4, atol=1e-6)
    else:
        assert np.all(means == 0) and np.all(variances == 1)
        np.testing.assert_array_equal(row, initial)


# Row 7 -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fidelity", "first_stop"), [("paper", 19), ("clean", 20)])
def test_early_stopping_may_stop_from_epoch_19_under_paper(fidelity, first_stop):
    settings = TrainSettings(min_epochs=20, fidelity=fidelity)
    rule = EarlyStopping(settings)
    stopped = next(e for e in range(40) if rule.update(e, 0.9 - 0.01 * e))
    assert (stopped, rule.reason, settings.first_stop_epoch) == (first_stop, "falling", first_stop)
    assert TrainSettings(min_epochs=0, fidelity=fidelity).first_stop_epoch == 0


# Row 8 -------------------------------------------------------------------------------------------


def indexed_images(name: str, n: int) -> ImageSet:
    """n training images whose first two pixels encode their row in the official file."""
    x = np.zeros((n, 32, 32, 3), np.uint8)
    x[:, 0, 0, 0], x[:, 0, 0, 1] = np.arange(n) // 256, np.arange(n) % 256
    y = np.arange(n) % 10
    return ImageSet(name, x, y, x[:10], y[:10])


def rows_of(x: np.ndarray) -> np.ndarray:
    return x[:, 0, 0, 0].astype(int) * 256 + x[:, 0, 0, 1]


@pytest.mark.parametrize("name", ["mnist", "fashion"])
@pytest.mark.parametrize("fidelity", FIDELITIES)
def test_mnist_leaves_out_the_first_5000_training_images_under_paper(name, fidelity):
    data = split_for_net(indexed_images(name, 6000), seed=0, fidelity=fidelity)
    used = np.concatenate([rows_of(data.x_train), rows_of(data.x_valid)])
    assert len(np.unique(used)) == len(used)
    if fidelity == "paper":  # of 60,000: 55,000 left, split 49,500 / 5,500
        assert (len(data.y_train), len(data.y_valid)) == (900, 100) and used.min() == 5000
    else:
        assert (len(data.y_train), len(data.y_valid)) == (5400, 600) and used.min() == 0


def test_other_datasets_keep_their_whole_training_set_under_paper():
    data = split_for_net(indexed_images("mnist5k", 4000), seed=0, fidelity="paper")
    assert (len(data.y_train), len(data.y_valid)) == (3600, 400)
    with pytest.raises(DataError, match=r"^dataset mnist: 5000 training images; fidelity paper"):
        split_for_net(indexed_images("mnist", 5000), seed=0, fidelity="paper")


# Row 9 -------------------------------------------------------------------------------------------


def test_the_released_pairwise_lr_metric_beside_the_per_sample_one():
    t = np.array([0.0, 1.0, 2.0, 3.0])
    assert np.abs(t - t).mean() == 0.0
    assert paper_pairwise_mae(t, t) == pytest.approx(1.25)  # mean_ij |t_i - t_j| = 20 / 16
    # Rates uniform in [0.0002, 0.005]: a perfect predictor scores about 0.0016, the median 0.0012.
    rates = np.random.default_rng(0).uniform(0.0002, 0.005, size=64 * 200)
    assert paper_pairwise_mae(rates, rates) == pytest.approx(0.0048 / 3, rel=0.02)
    assert paper_pairwise_mae(np.full_like(rates, np.median(rates)), rates) == pytest.approx(0.0012, rel=0.02)
    # Batches of 64, remainder dropped.
    assert paper_pairwise_mae(np.r_[np.zeros(64), 9.0], np.r_[np.zeros(64), 0.0]) == 0.0


# The parameter, end to end ------------------------------------------------------------------------


def test_fidelity_is_validated_with_one_line(tracking_uri, tmp_path, capsys):
    from nws.cli import main

    with pytest.raises(ParameterError, match=r"^fidelity: 'exact' is not one of paper, clean$"):
        TrainSettings(fidelity="exact")
    assert main(["sample", "--storage", str(tmp_path / "o.log"), "--fidelity", "exact"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "nws sample: error: fidelity: 'exact' is not one of paper, clean"
    ]


@pytest.mark.slow
def test_sample_logs_the_fidelity_and_snapshot_one_moving_means_follow_it(tracking_uri, tmp_path):
    storage = str(tmp_path / "optuna.log")
    options = SampleOptions(
        n_nets=1, datasets="mnist5k", prints=2, max_epochs=0, min_epochs=0, max_train_images=200,
        max_eval_images=100, seed=5, campaign="fidelity", storage=storage, config=TINY_TEXT,
    )  # fmt: skip
    assert options.fidelity == "paper"  # the default
    means = {}
    for fidelity in FIDELITIES:
        summary = run_campaign(dataclasses.replace(options, campaign=fidelity, fidelity=fidelity))
        run = mlflow.get_run(summary.finished[0])
        assert run.data.params["train_fidelity"] == fidelity
        folder = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="snapshots",
                                                          dst_path=str(tmp_path / fidelity)))  # fmt: skip
        weights = np.load(folder / "weights.npy")
        doc = json.loads((folder / "layout.json").read_text())
        entries = [t for t in doc["tensors"] if t["tensor"] == "moving_mean"]
        assert len(entries) == 5
        means[fidelity] = [weights[0, t["offset"] : t["offset"] + t["size"]] for t in entries]
        study = optuna.load_study(study_name=fidelity, storage=open_storage(storage))
        assert study.user_attrs["fidelity"] == fidelity
    assert all(np.any(m != 0) for m in means["paper"])  # snapshot 1: updated on data, every layer
    assert all(np.all(m == 0) for m in means["clean"])  # snapshot 1: the initial values
    with pytest.raises(ParameterError, match=r"^fidelity: campaign 'paper' was started with fidelity=paper"):
        run_campaign(dataclasses.replace(options, campaign="paper", fidelity="clean"))


def test_a_campaign_begun_before_the_option_continues_only_as_clean(tracking_uri, tmp_path):
    storage = str(tmp_path / "optuna.log")
    study = optuna.create_study(study_name="old", storage=open_storage(storage), direction="maximize")
    study.set_user_attr("subset", "main")
    study.set_user_attr("datasets", "mnist5k")
    study.set_user_attr("seed", 0)
    study.add_trial(optuna.trial.create_trial(value=0.5))  # a net trained before fidelity existed
    options = SampleOptions(datasets="mnist5k", campaign="old", storage=storage)
    with pytest.raises(ParameterError, match=r"^fidelity: campaign 'old' was started with fidelity=clean"):
        run_campaign(options)
