"""The weight-layout contract: sizes computed by hand, transposition order, exact round trips."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from nws.net.cnn import build_model, conv_blocks, layer_plan
from nws.net.regions import region_positions, region_segments, region_size
from nws.net.snapshots import flatten, load_into, unflatten, weight_layout
from nws.space import NetConfig

FIXED = NetConfig.parse("mnist,0.001,64,1,0,0,0,2,5,3,2,8,128")
SMALLEST = NetConfig.parse("mnist,0.001,64,1,0,0,0,2,3,3,2,4,64")
LARGEST = NetConfig.parse("mnist,0.001,64,1,0,0,1,3,7,5,4,12,192")


def test_conv_layers_are_spread_over_three_blocks():
    assert conv_blocks(3) == [1, 1, 1]
    assert conv_blocks(4) == [1, 1, 2]
    assert conv_blocks(5) == [1, 2, 2]


def bn(units: int) -> int:
    return 4 * units  # beta, gamma, moving mean, moving variance


@pytest.mark.parametrize(
    ("config", "conv", "fc"),
    [
        # Fixed: 5x5 kernels, channels 8/16/32, flatten 4*4*32 = 512, fc 128 -> 64 -> 20.
        (
            FIXED,
            (5 * 5 * 3 * 8 + 8 + bn(8)) + (5 * 5 * 8 * 16 + 16 + bn(16)) + (5 * 5 * 16 * 32 + 32 + bn(32)),
            (512 * 128 + 128 + bn(128)) + (128 * 64 + 64 + bn(64)) + (64 * 20 + 20),
        ),
        # Smallest: 3x3 kernels, channels 4/8/16, flatten 256, fc 64 -> 32 -> 20.
        (
            SMALLEST,
            (3 * 3 * 3 * 4 + 4 + bn(4)) + (3 * 3 * 4 * 8 + 8 + bn(8)) + (3 * 3 * 8 * 16 + 16 + bn(16)),
            (256 * 64 + 64 + bn(64)) + (64 * 32 + 32 + bn(32)) + (32 * 20 + 20),
        ),
        # Largest: 7x7 kernels, 5 conv layers [1, 2, 2] with channels 12/24/24/48/48,
        # flatten 4*4*48 = 768, fc 192 -> 96 -> 48 -> 24 -> 20.
        (
            LARGEST,
            (49 * 3 * 12 + 12 + bn(12))
            + (49 * 12 * 24 + 24 + bn(24))
            + (49 * 24 * 24 + 24 + bn(24))
            + (49 * 24 * 48 + 48 + bn(48))
            + (49 * 48 * 48 + 48 + bn(48)),
            (768 * 192 + 192 + bn(192))
            + (192 * 96 + 96 + bn(96))
            + (96 * 48 + 48 + bn(48))
            + (48 * 24 + 24 + bn(24))
            + (24 * 20 + 20),
        ),
    ],
    ids=["fixed", "smallest", "largest"],
)
def test_sizes_match_hand_computation_and_keras(config, conv, fc):
    layout = weight_layout(config)
    assert (layout.weightn_conv, layout.weightn_fc) == (conv, fc)
    assert layout.n_weights == conv + fc
    assert build_model(config).count_params() == conv + fc


def test_known_totals():
    assert weight_layout(FIXED).n_weights == 92868
    assert weight_layout(SMALLEST).n_weights == 21260
    assert weight_layout(LARGEST).n_weights == 388172


def test_order_is_conv_part_first_then_layer_by_layer():
    layout = weight_layout(LARGEST)
    parts = [e.part for e in layout]
    assert parts == sorted(parts)  # "conv" < "fc": all conv entries come first
    assert [e.tensor for e in layout][:6] == [
        "kernel", "bias", "beta", "gamma", "moving_mean", "moving_variance",
    ]  # fmt: skip
    offsets = [e.offset for e in layout]
    assert offsets == sorted(offsets) and offsets[0] == 0
    assert all(a.stop == b.offset for a, b in zip(layout.entries, layout.entries[1:], strict=False))
    assert layout.entries[-1].layer == "fc_final"
    assert [s.name for s in layer_plan(LARGEST)][:5] == [
        "conv1_1", "conv2_1", "conv2_2", "conv3_1", "conv3_2",
    ]  # fmt: skip


def test_kernels_are_written_per_output_then_per_input_channel():
    keras.utils.set_random_seed(0)
    model = build_model(SMALLEST)
    conv = model.get_layer("conv1_1")
    kernel = np.arange(np.prod(conv.kernel.shape), dtype=np.float32).reshape(conv.kernel.shape)
    conv.kernel.assign(kernel)
    dense = model.get_layer("fc1")
    dense_kernel = np.arange(np.prod(dense.kernel.shape), dtype=np.float32).reshape(dense.kernel.shape)
    dense.kernel.assign(dense_kernel)
    layout = weight_layout(SMALLEST)
    vector = flatten(model, layout)
    # First 3x3 block: output channel 0, input channel 0, row-major; then input channel 1.
    np.testing.assert_array_equal(vector[0:9], kernel[:, :, 0, 0].ravel())
    np.testing.assert_array_equal(vector[9:18], kernel[:, :, 1, 0].ravel())
    # After the 3 input channels of output 0 comes output channel 1.
    np.testing.assert_array_equal(vector[27:36], kernel[:, :, 0, 1].ravel())
    fc1 = next(e for e in layout if e.layer == "fc1" and e.tensor == "kernel")
    inputs = dense_kernel.shape[0]
    # A dense neuron's incoming weights are consecutive.
    np.testing.assert_array_equal(vector[fc1.offset : fc1.offset + inputs], dense_kernel[:, 0])
    bn_gamma = next(e for e in layout if e.layer == "conv1_1" and e.tensor == "gamma")
    np.testing.assert_array_equal(
        vector[bn_gamma.offset : bn_gamma.stop], model.get_layer("conv1_1_bn").gamma.numpy()
    )


@pytest.mark.parametrize("config", [FIXED, SMALLEST, LARGEST], ids=["fixed", "smallest", "largest"])
def test_flatten_unflatten_round_trip_gives_the_same_keras_weights(config):
    keras.utils.set_random_seed(1)
    source = build_model(config)
    # Non-trivial batch-norm statistics, so that every tensor differs from its initial value.
    for layer in source.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.moving_mean.assign(np.random.default_rng(0).normal(size=layer.moving_mean.shape))
    layout = weight_layout(config)
    vector = flatten(source, layout)
    assert vector.dtype == np.float32 and vector.shape == (layout.n_weights,)
    keras.utils.set_random_seed(2)
    target = build_model(config)
    load_into(target, vector, layout)
    for a, b in zip(source.weights, target.weights, strict=True):
        assert a.path == b.path
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    np.testing.assert_array_equal(flatten(target, layout), vector)
    tensors = unflatten(vector, layout)
    assert tensors[("fc_final", "kernel")].shape == layout.entries[-2].shape


def test_the_nonkernel_region_is_every_bias_and_batch_norm_tensor_by_hand():
    """The fixed net: per layer, its bias and (but for the output) batch norm's 4 tensors follow its
    kernel, so the region is one run per layer, 1,260 weights in all."""
    layout = weight_layout(FIXED)
    n, conv = layout.n_weights, layout.weightn_conv
    kernels = [5 * 5 * 3 * 8, 5 * 5 * 8 * 16, 5 * 5 * 16 * 32, 512 * 128, 128 * 64, 64 * 20]
    units = [8, 16, 32, 128, 64, 20]
    runs, at = [], 0
    for kernel, width, last in zip(kernels, units, [False] * 5 + [True], strict=True):
        size = width if last else width + bn(width)
        runs.append([at + kernel, at + kernel + size])
        at += kernel + size
    assert at == n
    assert region_segments(n, conv, "nonkernel").tolist() == runs
    assert region_size(n, conv, "nonkernel") == 5 * (8 + 16 + 32 + 128 + 64) + 20 == 1260
    assert region_segments(n, conv, "fc").tolist() == [[conv, n]]
    assert region_size(n, conv, "all") == n


@pytest.mark.parametrize("config", [FIXED, LARGEST], ids=["fixed", "largest"])
def test_the_nonkernel_region_reads_the_keras_biases_and_batch_norm_in_layout_order(config):
    model = build_model(config)
    rng = np.random.default_rng(3)
    for weight in model.weights:  # every value distinct, biases and batch norm included
        weight.assign(rng.normal(size=weight.shape).astype(np.float32))
    layout = weight_layout(config)
    vector = flatten(model, layout)
    positions = region_positions(layout.n_weights, layout.weightn_conv, "nonkernel")
    by_path = {w.path: w.numpy() for w in model.weights}  # Keras' own names, e.g. conv1_1_bn/gamma
    wanted = [by_path[f"{e.keras_layer}/{e.tensor}"] for e in layout if e.tensor != "kernel"]
    assert len(wanted) == len(by_path) - len(layer_plan(config))  # all but one kernel per layer
    np.testing.assert_array_equal(vector[positions], np.concatenate(wanted))


def test_batch_norm_off_has_no_batch_norm_tensors_and_round_trips():
    config = NetConfig.parse("mnist,0.001,64,0,0,0,0,2,3,3,2,4,64")
    layout = weight_layout(config)
    assert {e.tensor for e in layout} == {"kernel", "bias"}
    model = build_model(config)
    assert model.count_params() == layout.n_weights
    vector = flatten(model, layout)
    other = build_model(config)
    load_into(other, vector, layout)
    np.testing.assert_array_equal(flatten(other, layout), vector)


def test_layout_records_round_trip_through_json():
    import json

    from nws.net.snapshots import WeightLayout

    layout = weight_layout(LARGEST)
    again = WeightLayout.from_records(json.loads(json.dumps(layout.to_records())))
    assert again == layout
