"""Function-preserving transformations (nws.net.symmetry) checked on real Keras nets: the logits of
the transformed vector on real images equal the original's.

Tolerance: the logits are float32, so the bound is relative to their scale:
max |transformed - original| <= tol * max |original|, tol = 1e-5 with moving statistics or no
batch norm (measured at most 1.7e-6 over 20 random nets) and 1e-4 under fidelity `paper`, whose
batch statistics amplify the rounding of reordered float32 sums in channels that vary little
across the batch (measured at most 1.3e-5). A wrong transformation moves the logits by more than
1e-2 of their scale (`test_channels_feed_the_dense_layer_in_strided_blocks`).
"""

from __future__ import annotations

import numpy as np
import pytest

from nws.net.snapshots import WeightLayout, load_into, unflatten, weight_layout
from nws.net.symmetry import (
    apply_permutations,
    hidden_layers,
    inverse_permutations,
    permute,
    random_permutations,
    rescale,
)
from nws.space import NetConfig

TOLERANCE = {"paper": 1e-4, "clean": 1e-5}


def small_config(batch_norm: str = "on", activation: str = "relu") -> NetConfig:
    """Filter 3, four convs (block 3 holds two: conv -> conv inside a block), three dense layers."""
    return NetConfig("digits", 0.001, 32, batch_norm, "off", "adam", activation, "normal",
                     3, 4, 3, 4, 64)  # fmt: skip


def random_vector(layout: WeightLayout, rng: np.random.Generator) -> np.ndarray:
    """Every tensor randomised, the moving statistics included (positive variances), at a scale
    that keeps the activations of order one through the net."""
    vector = np.empty(layout.n_weights, np.float32)
    for entry in layout:
        if entry.tensor == "kernel":
            values = rng.normal(0.0, 1.5 / np.sqrt(np.prod(entry.shape[:-1])), entry.size)
        elif entry.tensor == "moving_variance":
            values = rng.uniform(0.5, 2.0, entry.size)
        elif entry.tensor == "gamma":
            values = rng.normal(1.0, 0.3, entry.size)
        else:
            values = rng.normal(0.0, 0.3, entry.size)
        vector[entry.offset : entry.stop] = values
    return vector


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    from nws.data import load_images

    return load_images("digits").x_test[:64].astype(np.float32) / 255.0


class Net:
    """A built model of a configuration, and its logits for any vector of its layout."""

    def __init__(self, config: NetConfig, fidelity: str, images: np.ndarray) -> None:
        from nws.net.cnn import build_model

        self.layout = weight_layout(config)
        self.model = build_model(config, fidelity=fidelity)
        self.images = images
        self.tolerance = TOLERANCE[fidelity] if config.batch_norm == "on" else TOLERANCE["clean"]

    def logits(self, vector: np.ndarray) -> np.ndarray:
        import keras

        load_into(self.model, vector, self.layout)
        return keras.ops.convert_to_numpy(self.model(self.images, training=False))


def assert_same_function(net: Net, original: np.ndarray, transformed: np.ndarray) -> None:
    assert np.abs(transformed - original).max() > 0.1  # the test would be vacuous otherwise
    before, after = net.logits(original), net.logits(transformed)
    scale = np.abs(before).max()
    assert scale > 0.5  # logits that say something
    assert np.abs(after - before).max() <= net.tolerance * scale


CASES = [("on", "paper"), ("on", "clean"), ("off", "clean")]  # no batch norm: fidelities agree


@pytest.mark.parametrize(("batch_norm", "fidelity", "activation"),
                         [*((b, f, "relu") for b, f in CASES), ("on", "paper", "elu")])  # fmt: skip
def test_permutation_preserves_the_function(batch_norm, fidelity, activation, images) -> None:
    net = Net(small_config(batch_norm, activation), fidelity, images)
    rng = np.random.default_rng(1)
    original = random_vector(net.layout, rng)
    permuted = permute(original, net.layout, rng)
    assert np.array_equal(np.sort(permuted), np.sort(original))  # the same values, moved
    assert_same_function(net, original, permuted)


@pytest.mark.parametrize(("batch_norm", "fidelity"), CASES)
def test_rescaling_preserves_the_function_of_a_relu_net(batch_norm, fidelity, images) -> None:
    net = Net(small_config(batch_norm), fidelity, images)
    rng = np.random.default_rng(2)
    original = random_vector(net.layout, rng)
    rescaled = rescale(original, net.layout, rng, activation="relu", low=0.25, high=4.0)
    assert_same_function(net, original, rescaled)
    tensors, before = unflatten(rescaled, net.layout), unflatten(original, net.layout)
    if batch_norm == "on":  # the symmetry lives on gamma and beta; the kernels' outputs are untouched
        assert not np.allclose(tensors[("conv1_1_bn", "gamma")], before[("conv1_1_bn", "gamma")])
        assert np.array_equal(tensors[("conv1_1", "bias")], before[("conv1_1", "bias")])
    else:
        assert not np.allclose(tensors[("conv1_1", "bias")], before[("conv1_1", "bias")])


def test_inverse_permutation_restores_the_vector_exactly() -> None:
    layout = weight_layout(small_config())
    rng = np.random.default_rng(3)
    original = random_vector(layout, rng)
    permutations = random_permutations(layout, rng)
    assert sorted(permutations) == ["conv1_1", "conv2_1", "conv3_1", "conv3_2", "fc1", "fc2", "fc3"]
    permuted = apply_permutations(original, layout, permutations)
    assert not np.array_equal(permuted, original)
    restored = apply_permutations(permuted, layout, inverse_permutations(permutations))
    assert np.array_equal(restored, original)
    assert restored.dtype == np.float32


def test_channels_feed_the_dense_layer_in_strided_blocks(images) -> None:
    """Permuting the last conv's channels with fc1's rows taken as contiguous [C, 16] blocks (a
    channels-first flatten) changes the function; `apply_permutations`' strided rows do not."""
    net = Net(small_config(), "clean", images)
    rng = np.random.default_rng(4)
    original = random_vector(net.layout, rng)
    last_conv = next(layer for layer in hidden_layers(net.layout) if layer.next_layer == "fc1")
    p = rng.permutation(last_conv.units)
    right = apply_permutations(original, net.layout, {last_conv.name: p})
    assert_same_function(net, original, right)

    tensors = unflatten(right, net.layout)
    kernel = unflatten(original, net.layout)[("fc1", "kernel")]
    tensors[("fc1", "kernel")] = kernel.reshape(last_conv.units, -1, kernel.shape[-1])[p].reshape(
        kernel.shape
    )
    wrong = np.concatenate([e.to_storage(tensors[(e.keras_layer, e.tensor)]) for e in net.layout])
    before, after = net.logits(original), net.logits(wrong.astype(np.float32))
    assert np.abs(after - before).max() > 0.01 * np.abs(before).max()


@pytest.mark.parametrize("activation", ["elu", "sigmoid", "tanh"])
def test_rescaling_refuses_an_activation_that_is_not_positively_homogeneous(activation) -> None:
    layout = weight_layout(small_config(activation=activation))
    vector = random_vector(layout, np.random.default_rng(5))
    with pytest.raises(ValueError, match=f"activation '{activation}' is not positively homogeneous"):
        rescale(vector, layout, np.random.default_rng(0), activation=activation)


def test_bad_arguments_are_refused() -> None:
    layout = weight_layout(small_config())
    vector = random_vector(layout, np.random.default_rng(6))
    with pytest.raises(ValueError, match="not a permutation"):
        apply_permutations(vector, layout, {"conv1_1": np.array([0, 0, 1, 2])})
    with pytest.raises(ValueError, match="not hidden layers of this layout: fc_final"):
        apply_permutations(vector, layout, {"fc_final": np.arange(20)})
    with pytest.raises(ValueError, match="low <= high"):
        rescale(vector, layout, np.random.default_rng(0), activation="relu", low=0.0)
    with pytest.raises(ValueError, match="expected a flat vector"):
        permute(vector[:-1], layout, np.random.default_rng(0))
