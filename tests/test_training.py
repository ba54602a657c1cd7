"""Training one net: the NWS early-stopping rules, snapshot selection and capture, real Keras
training that is reproducible bit for bit and reports divergence."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest

from nws.data import BalancedSampler, load_images, split_for_net
from nws.net.snapshots import SnapshotRecorder, select_prints, weight_layout
from nws.net.training import EarlyStopping, TrainingDiverged, TrainSettings, train_net
from nws.progress import Progress
from nws.space import NetConfig

SETTINGS = TrainSettings(max_epochs=1000, min_epochs=20, fidelity="clean")
"""The rules with the first stop after `min_epochs` epochs (fidelity paper: one earlier, see
tests/test_fidelity.py)."""


def run_rule(accuracies, settings=SETTINGS):
    """Feed accuracies for epochs 0, 1, ...; return (the epoch it stopped at, the reason)."""
    rule = EarlyStopping(settings)
    for epoch, accuracy in enumerate(accuracies):
        if rule.update(epoch, accuracy):
            return epoch, rule.reason
    return None, None


def test_five_consecutive_falls_stop_after_min_epochs():
    rising = list(np.linspace(0.1, 0.9, 25))
    falling = [0.9 - 0.01 * i for i in range(1, 6)]
    assert run_rule(rising + falling) == (29, "falling")
    # Four falls then a rise resets the count.
    assert run_rule(rising + falling[:4] + [0.95] + falling[:4]) == (None, None)


def test_falls_before_min_epochs_stop_only_once_min_epochs_is_reached():
    # Falls from epoch 1 on: the count reaches 5 early, the stop waits for epoch 20.
    assert run_rule([0.5 - 0.001 * i for i in range(30)]) == (20, "falling")


def test_thirty_unchanged_epochs_stop():
    acc = [0.1, 0.2, 0.3, 0.4] + [0.5] * 40
    # Change < 1e-8 from epoch 5 on: stationary count hits 30 at epoch 34.
    assert run_rule(acc) == (34, "stationary")


def test_thirty_epochs_below_the_running_average_stop():
    # Alternate high/low: every low epoch is below the 0.5-weighted running average, but never
    # five falls in a row and never unchanged.
    acc = [0.5 + (0.1 if i % 2 else -0.1) + 0.0001 * i for i in range(100)]
    epoch, reason = run_rule(acc)
    assert reason == "below_average"
    lows_below = sum(1 for i in range(1, epoch + 1) if i % 2 == 0)
    assert lows_below == 30


def test_min_epochs_zero_allows_an_immediate_stop():
    settings = dataclasses.replace(SETTINGS, min_epochs=0, fall_patience=1)
    assert run_rule([0.5, 0.4], settings) == (1, "falling")


def test_snapshot_selection_follows_round_linspace():
    assert select_prints(20, 20).tolist() == list(range(1, 21))
    picks = select_prints(101, 20)
    assert picks[0] == 1 and picks[-1] == 101 and len(picks) == 20
    np.testing.assert_array_equal(picks, np.round(np.linspace(1, 101, 20)).astype(int))
    # Fewer evaluations than prints: rows repeat.
    # linspace(1, 5, 8) = 1, 1.57, 2.14, 2.71, 3.29, 3.86, 4.43, 5
    assert select_prints(5, 8).tolist() == [1, 2, 2, 3, 3, 4, 4, 5]
    with pytest.raises(ValueError):
        select_prints(0, 20)


TINY = NetConfig.parse("shapes,0.002,32,1,1,0,0,2,3,3,2,4,64")


@pytest.fixture(scope="module")
def tiny_data():
    return split_for_net(load_images("shapes"), seed=4, max_train_images=160, max_eval_images=64)


def train_tiny(data, seed, config=TINY, epochs=3, observers=(), mixed_precision=False, fidelity="paper"):
    settings = TrainSettings(
        max_epochs=epochs, min_epochs=epochs, mixed_precision=mixed_precision, fidelity=fidelity
    )
    layout = weight_layout(config)
    with SnapshotRecorder(layout) as recorder:
        result = train_net(config, data, seed, settings, [recorder.record, *observers])
        size = recorder.size
        weights, rows = recorder.select(4)
    return result, weights, rows, size


@pytest.fixture(scope="module")
def seed9(tiny_data):
    """One tiny training run (seed 9, 2 epochs) that several tests look at."""
    return train_tiny(tiny_data, seed=9, epochs=2)


@pytest.mark.slow
def test_training_is_bit_identical_for_a_seed_and_captures_every_evaluation(tiny_data, seed9):
    result, weights, rows, size = seed9
    again = train_tiny(tiny_data, seed=9, epochs=2)
    other = train_tiny(tiny_data, seed=10, epochs=2)
    layout = weight_layout(TINY)
    # Epoch 0 (initialisation) + 2 epochs, each written to the temporary file; 4 prints repeat one.
    assert [h["epoch"] for h in result.history] == [0, 1, 2]
    assert size == 3 * layout.n_weights * 4
    assert weights.shape == (4, layout.n_weights) and weights.dtype == np.float32
    assert [r["epoch"] for r in rows] == [0, 1, 1, 2]
    np.testing.assert_array_equal(weights, again[1])  # augmentation is on in TINY
    assert not np.array_equal(weights[1:], other[1][1:])
    assert not np.array_equal(weights[0], weights[-1])  # the net trained
    balanced = BalancedSampler(tiny_data.y_train, 0)
    assert result.steps_per_epoch == balanced.epoch_size // 32 > 0
    for h in result.history:
        assert 0.0 <= h["valid_accuracy"] <= 1.0 and np.isfinite(h["loss"])


@pytest.mark.slow
def test_snapshot_one_is_the_pure_initialisation_under_clean(tiny_data):
    """Under fidelity paper, snapshot 1's moving statistics come from the evaluation batches
    (tests/test_fidelity.py); under clean it is the initialisation, every tensor."""
    import keras

    from nws.net.cnn import build_model
    from nws.net.snapshots import flatten

    _, weights, _, _ = train_tiny(tiny_data, seed=9, epochs=1, fidelity="clean")
    keras.utils.set_random_seed(9)
    initial = flatten(build_model(TINY, fidelity="clean"), weight_layout(TINY))
    np.testing.assert_array_equal(weights[0], initial)
    assert not np.array_equal(weights[-1], initial)


@pytest.mark.slow
def test_a_diverging_net_raises_with_its_epoch(tiny_data):
    # A learning rate far outside the space (the dataclass does not validate) makes the loss
    # overflow within a few steps: a real NaN from real training.
    exploding = dataclasses.replace(TINY, lrate=1e12, optimizer="momentum", augmentation="off")
    with pytest.raises(TrainingDiverged) as diverged:
        train_tiny(tiny_data, seed=1, config=exploding, epochs=5)
    assert 1 <= diverged.value.epoch <= 5


@pytest.mark.slow
def test_a_net_on_kept_models_is_bit_identical_to_the_net_built_fresh():
    """Five nets, each trained first on models of its own, then again on the same compiled
    models (and tf.data pipelines) after another net of its graph trained on them, every
    property value among them: weights at every evaluation and every metric equal bit for bit
    (tests/kept_models.py)."""
    from tests.kept_models import kept_versus_fresh

    result = kept_versus_fresh()
    assert result["hits"] == 10 and result["misses"] == 5
    assert result["identical"] == [True] * 5 and result["evaluations"] == 3


@pytest.mark.slow
def test_progress_prints_plain_lines_when_not_a_terminal(tiny_data):
    stream = io.StringIO()
    progress = Progress(1, stream=stream)
    progress.start_net(1, "tiny", 3)
    train_tiny(tiny_data, seed=2, observers=[progress.epoch])
    progress.end_net("net 1/1 finished")
    lines = stream.getvalue().splitlines()
    assert lines[0] == "net 1/1: tiny"
    assert [line.split(":")[0] for line in lines[1:5]] == [f"net 1/1 epoch {e}/3" for e in range(4)]
    assert lines[-1] == "net 1/1 finished"
    assert "\r" not in stream.getvalue()


@pytest.mark.slow
def test_mixed_precision_trains_and_snapshots_stay_float32(tiny_data):
    result, weights, _, _ = train_tiny(tiny_data, seed=3, epochs=2, mixed_precision=True)
    assert weights.dtype == np.float32 and np.isfinite(weights).all()
    assert weights.shape == (4, weight_layout(TINY).n_weights)
    assert all(np.isfinite(h["loss"]) for h in result.history)


def test_the_snapshot_file_has_no_name_so_a_killed_trainer_leaves_nothing(tmp_path):
    from nws.net.cnn import build_model
    from nws.net.snapshots import flatten

    layout, model = weight_layout(TINY), build_model(TINY)
    with SnapshotRecorder(layout, directory=str(tmp_path)) as recorder:
        recorder.record(model, 0, {"valid_accuracy": 0.5})
        recorder.record(model, 1, {"valid_accuracy": 0.6})
        assert list(tmp_path.iterdir()) == []
        assert recorder.size == 2 * 4 * layout.n_weights
        weights, rows = recorder.select(2)
    np.testing.assert_array_equal(weights[1], flatten(model, layout))
    assert [r["valid_accuracy"] for r in rows] == [0.5, 0.6]
