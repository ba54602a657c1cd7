"""The CNN family of the NWS study (reference section 4), with stable, explicit layer names.

`layer_plan` describes the trainable layers from a configuration alone (no Keras), so the weight
layout can be computed, checked and documented without building a model; `build_model` turns the
same plan into a Keras 3 model.

Names: conv layers `conv{block}_{i}` (+ `_bn`, `_act`), pools `pool{block}`, hidden dense layers
`fc{i}` (+ `_act`, `_bn`, `_dropout`), the output layer `fc_final`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nws.net.fidelity import DEFAULT_FIDELITY, PAPER, check_fidelity
from nws.space import NetConfig

IMAGE_SHAPE = (32, 32, 3)
N_BLOCKS = 3
N_LOGITS = 20
"""Every dataset gets the same 20-logit output layer, as in the original study."""
DROPOUT = 0.5
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5
"""Batch-norm settings of the original (TensorLayer's BatchNormLayer defaults). Under fidelity
`paper` the layer also draws gamma from N(1, 0.002) and always uses batch statistics
(`nws.net.layers.BatchStatisticsNormalization`); under `clean` it is Keras' own, gamma 1."""


@dataclass(frozen=True)
class LayerSpec:
    """One layer that owns weights: a conv, a hidden dense layer or the output layer."""

    name: str
    kind: str  # "conv", "dense" or "output"
    kernel_shape: tuple[int, ...]  # Keras kernel shape: [k, k, in, out] or [in, out]
    batch_norm: bool

    @property
    def units(self) -> int:
        return self.kernel_shape[-1]

    @property
    def part(self) -> str:
        """Which part of the flat vector this layer belongs to."""
        return "conv" if self.kind == "conv" else "fc"


def conv_blocks(depth_conv: int) -> list[int]:
    """Conv layers per block: 3 -> [1, 1, 1], 4 -> [1, 1, 2], 5 -> [1, 2, 2]."""
    per_block = [depth_conv // N_BLOCKS] * N_BLOCKS
    for block in range(N_BLOCKS - 1, 0, -1):
        if sum(per_block) < depth_conv:
            per_block[block] += 1
    return per_block


def layer_plan(config: NetConfig) -> list[LayerSpec]:
    """The weight-owning layers of a net in creation order."""
    bn = config.batch_norm == "on"
    k = config.filter_size
    layers: list[LayerSpec] = []
    channels = IMAGE_SHAPE[2]
    for block, n_layers in enumerate(conv_blocks(config.depth_conv)):
        width = config.width_conv * 2**block
        for i in range(n_layers):
            layers.append(LayerSpec(f"conv{block + 1}_{i + 1}", "conv", (k, k, channels, width), bn))
            channels = width
    side = IMAGE_SHAPE[0] // 2**N_BLOCKS
    features = side * side * channels
    for i in range(config.depth_fc):
        units = int(config.width_fc * 2.0**-i)
        layers.append(LayerSpec(f"fc{i + 1}", "dense", (features, units), bn))
        features = units
    layers.append(LayerSpec("fc_final", "output", (features, N_LOGITS), False))
    return layers


def _kernel_initializer(name: str) -> Any:
    import keras

    return {
        "constant": keras.initializers.Constant(0.1),
        "normal": keras.initializers.RandomNormal(mean=0.0, stddev=1.0),
        "glorot_uniform": keras.initializers.GlorotUniform(),
        "glorot_normal": keras.initializers.GlorotNormal(),
    }[name]


def _batch_norm_layer(fidelity: str) -> Any:
    """The batch-norm class of a fidelity; the layer names, and so the weight layout, are the same."""
    if fidelity == PAPER:
        from nws.net.layers import BatchStatisticsNormalization

        return BatchStatisticsNormalization
    import keras

    return keras.layers.BatchNormalization


def build_model(config: NetConfig, mixed_precision: bool = False, fidelity: str = DEFAULT_FIDELITY) -> Any:
    """The Keras model of a configuration: conv -> BN -> act blocks, dense -> act -> BN -> dropout.

    Call `keras.utils.set_random_seed` first for a reproducible initialisation. `fidelity`
    picks the batch norm (see `nws.net.fidelity`).
    """
    import keras
    from keras import layers

    dtype = "mixed_float16" if mixed_precision else None
    norm_class = _batch_norm_layer(check_fidelity(fidelity))

    def batch_norm(name: str) -> Any:
        return norm_class(momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=f"{name}_bn", dtype=dtype)

    activation = config.activation
    inputs = keras.Input(shape=IMAGE_SHAPE, name="image")
    x = inputs
    plan = layer_plan(config)
    convs = iter(spec for spec in plan if spec.kind == "conv")
    for block, n_layers in enumerate(conv_blocks(config.depth_conv), start=1):
        for spec in (next(convs) for _ in range(n_layers)):
            x = layers.Conv2D(
                spec.units,
                spec.kernel_shape[0],
                padding="same",
                kernel_initializer=_kernel_initializer(config.initialization),
                bias_initializer="zeros",
                name=spec.name,
                dtype=dtype,
            )(x)
            if spec.batch_norm:
                x = batch_norm(spec.name)(x)
            x = layers.Activation(activation, name=f"{spec.name}_act", dtype=dtype)(x)
        x = layers.MaxPooling2D(2, name=f"pool{block}", dtype=dtype)(x)
    x = layers.Flatten(name="flatten", dtype=dtype)(x)
    for spec in plan:
        if spec.kind != "dense":
            continue
        x = layers.Dense(
            spec.units,
            kernel_initializer=_kernel_initializer(config.initialization),
            bias_initializer="zeros",
            name=spec.name,
            dtype=dtype,
        )(x)
        x = layers.Activation(activation, name=f"{spec.name}_act", dtype=dtype)(x)
        if spec.batch_norm:
            x = batch_norm(spec.name)(x)
        x = layers.Dropout(DROPOUT, name=f"{spec.name}_dropout", dtype=dtype)(x)
    output = plan[-1]
    logits = layers.Dense(
        output.units,
        kernel_initializer=_kernel_initializer(config.initialization),
        bias_initializer="zeros",
        name=output.name,
        dtype="float32",
    )(x)
    return keras.Model(inputs, logits, name="nws_cnn")
