"""Function-preserving transformations of a net's flat weight vector (issue 18).

Two nets whose vectors differ by one of these compute the same logits on every input, so a
meta-classifier that tells them apart reads the parametrisation, not the function. Both work on
the layout of `nws.net.snapshots` and return a new vector; the hidden layers are the convs and the
hidden dense layers (never the 3 image channels nor the 20 logits).

Permutation (any activation, batch norm on or off). Hidden unit j of a layer owns column j of its
kernel (the Keras output axis), its bias and its batch-norm vectors (beta, gamma, moving mean,
moving variance), and feeds the next layer through that layer's incoming slice j. Batch norm,
the activation, max-pooling and dropout all act per channel, so renumbering the units of a layer
and the incoming slices of the next layer together changes nothing. The incoming slice of unit j
is axis -2 of the next kernel reshaped to [-1, units, out]: a conv kernel [k, k, in, out] reshapes
to [k*k, in, out]; a dense kernel after a conv reads the 4x4xC map flattened channels-last,
row (h*4 + w)*C + c, so [16C, out] reshapes to [16, C, out] and the channel is a block-strided
row set; a dense kernel after a dense layer is [in, out] itself.

Positive rescaling (ReLU nets only: ReLU(c x) = c ReLU(x) for c > 0 and no other activation of
the space has this; elu, sigmoid and tanh are not positively homogeneous). Per layer type of our
architecture, what is exact:

* Batch norm off, conv -> ReLU [-> max-pool] and dense -> ReLU -> dropout: multiply unit j's
  kernel column and bias by c_j and its incoming slice in the next layer by 1/c_j. Max-pooling
  commutes with a positive per-channel factor (max(c x) = c max(x)) and dropout is linear.
* Batch norm on, conv -> BN -> ReLU [-> max-pool]: BN outputs gamma * xhat + beta, with xhat
  normalised by the batch's or the moving statistics. Multiplying gamma_j and beta_j by c_j
  multiplies BN's output, hence ReLU's, by c_j; the next layer's slice j by 1/c_j undoes it. xhat
  is untouched, so this is exact with batch statistics (fidelity `paper`, also at inference),
  with moving statistics (`clean`), and even the moving statistics BN keeps updating stay equal.
* Batch norm on, dense -> ReLU -> BN -> dropout: the same factor on gamma_j and beta_j, 1/c_j on
  the next layer's row j. Nothing nonlinear lies between BN and the next layer, so this one would
  hold for any activation (and any c != 0); `rescale` still refuses non-ReLU nets, whose convs have
  no such symmetry.

Not applied, because they are not exact: scaling a conv's (or dense layer's) kernel and bias by c
in front of batch norm. BN divides by sqrt(var + eps), and c x over sqrt(c^2 var + eps) is not x
over sqrt(var + eps) while eps = 1e-5 > 0. With moving statistics (mean * c, variance * c^2) a
matching gamma * sqrt(c^2 var + eps) / (c sqrt(var + eps)) would repair it, but with batch
statistics (`paper`) var is the batch's, so no fixed gamma does.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from nws.net.snapshots import BN_TENSORS, WeightLayout, unflatten

HOMOGENEOUS_ACTIVATIONS = ("relu",)


@dataclass(frozen=True)
class HiddenLayer:
    """A layer whose units can be renumbered or rescaled, and the layer its units feed."""

    name: str  # conv1_1, fc2
    keras_layer: str  # the layer holding kernel and bias
    batch_norm: str | None  # the Keras batch-norm layer, or None
    units: int
    next_layer: str  # the Keras layer whose kernel reads these units


def hidden_layers(layout: WeightLayout) -> list[HiddenLayer]:
    """The hidden layers of a layout in creation order (every weight-owning layer but the last)."""
    order: list[str] = []
    tensors: dict[str, dict[str, str]] = {}
    units: dict[str, int] = {}
    for entry in layout:
        if entry.layer not in tensors:
            order.append(entry.layer)
            tensors[entry.layer] = {}
        tensors[entry.layer][entry.tensor] = entry.keras_layer
        if entry.tensor == "kernel":
            units[entry.layer] = entry.shape[-1]
    layers = []
    for name, following in itertools.pairwise(order):
        owned = tensors[name]
        layers.append(
            HiddenLayer(name, owned["kernel"], owned.get("gamma"), units[name], tensors[following]["kernel"])
        )
    return layers


def random_permutations(layout: WeightLayout, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A uniformly drawn permutation of the units of every hidden layer."""
    return {layer.name: rng.permutation(layer.units) for layer in hidden_layers(layout)}


def inverse_permutations(permutations: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The permutations that undo these."""
    return {name: np.argsort(p) for name, p in permutations.items()}


def random_scales(
    layout: WeightLayout, rng: np.random.Generator, low: float = 0.5, high: float = 2.0
) -> dict[str, np.ndarray]:
    """A factor per unit of every hidden layer, log-uniform in [low, high]."""
    if not 0 < low <= high:
        raise ValueError(f"rescale: need 0 < low <= high, got low={low}, high={high}")
    return {
        layer.name: np.exp(rng.uniform(np.log(low), np.log(high), layer.units))
        for layer in hidden_layers(layout)
    }


def _next_inputs(kernel: np.ndarray, units: int) -> np.ndarray:
    """The next layer's kernel as [-1, units, out]: axis 1 is the unit read (see the module
    docstring: conv [k, k, in, out], dense-after-flatten [(h, w, c), out], dense [in, out])."""
    reads = kernel.shape[2] == units if kernel.ndim == 4 else kernel.shape[0] % units == 0
    if not reads:
        raise ValueError(f"a kernel of shape {kernel.shape} does not read {units} units")
    return kernel.reshape(-1, units, kernel.shape[-1])


def _to_vector(
    tensors: Mapping[tuple[str, str], np.ndarray], layout: WeightLayout, dtype: np.dtype
) -> np.ndarray:
    out = np.empty(layout.n_weights, dtype=dtype)
    for entry in layout:
        out[entry.offset : entry.stop] = entry.to_storage(tensors[(entry.keras_layer, entry.tensor)])
    return out


def _per_layer(
    values: Mapping[str, np.ndarray], layers: list[HiddenLayer], what: str
) -> dict[str, np.ndarray]:
    by_name = {layer.name: layer for layer in layers}
    unknown = sorted(set(values) - set(by_name))
    if unknown:
        raise ValueError(f"{what}: not hidden layers of this layout: {', '.join(unknown)}")
    out = {}
    for name, value in values.items():
        value = np.asarray(value)
        if value.shape != (by_name[name].units,):
            raise ValueError(f"{what}: {name} has {by_name[name].units} units, got shape {value.shape}")
        out[name] = value
    return out


def apply_permutations(
    vector: np.ndarray, layout: WeightLayout, permutations: Mapping[str, np.ndarray]
) -> np.ndarray:
    """The vector with the units of each named hidden layer renumbered: new unit i is old unit
    `permutation[i]`. Layers not named keep their order."""
    vector = np.asarray(vector)
    layers = hidden_layers(layout)
    permutations = _per_layer(permutations, layers, "permute")
    tensors = unflatten(vector, layout)
    for layer in layers:
        if layer.name not in permutations:
            continue
        p = permutations[layer.name]
        if not np.array_equal(np.sort(p), np.arange(layer.units)):
            raise ValueError(f"permute: the order given for {layer.name} is not a permutation")
        for tensor in ("kernel", "bias"):
            key = (layer.keras_layer, tensor)
            tensors[key] = tensors[key][..., p]
        if layer.batch_norm is not None:
            for tensor in BN_TENSORS:
                key = (layer.batch_norm, tensor)
                tensors[key] = tensors[key][p]
        key = (layer.next_layer, "kernel")
        kernel = tensors[key]
        tensors[key] = _next_inputs(kernel, layer.units)[:, p, :].reshape(kernel.shape)
    return _to_vector(tensors, layout, vector.dtype)


def permute(vector: np.ndarray, layout: WeightLayout, rng: np.random.Generator) -> np.ndarray:
    """The vector with the units of every hidden layer randomly renumbered (same function)."""
    return apply_permutations(vector, layout, random_permutations(layout, rng))


def _check_activation(activation: str) -> None:
    if activation not in HOMOGENEOUS_ACTIVATIONS:
        raise ValueError(
            f"rescale: activation {activation!r} is not positively homogeneous; only a relu net keeps "
            "its function under unit rescaling"
        )


def apply_scales(
    vector: np.ndarray, layout: WeightLayout, scales: Mapping[str, np.ndarray], *, activation: str
) -> np.ndarray:
    """The vector with unit j of each named hidden layer scaled by `scales[layer][j]` > 0 where
    that preserves the function of a ReLU net (the module docstring says where), and its
    incoming slice in the next layer by the inverse."""
    _check_activation(activation)
    vector = np.asarray(vector)
    layers = hidden_layers(layout)
    scales = _per_layer(scales, layers, "rescale")
    tensors = {key: np.asarray(value, np.float64) for key, value in unflatten(vector, layout).items()}
    for layer in layers:
        if layer.name not in scales:
            continue
        c = np.asarray(scales[layer.name], np.float64)
        if not (np.isfinite(c).all() and (c > 0).all()):
            raise ValueError(f"rescale: the factors of {layer.name} must be positive and finite")
        if layer.batch_norm is None:
            owned = [(layer.keras_layer, "kernel"), (layer.keras_layer, "bias")]
        else:
            owned = [(layer.batch_norm, "gamma"), (layer.batch_norm, "beta")]
        for key in owned:
            tensors[key] = tensors[key] * c
        key = (layer.next_layer, "kernel")
        kernel = tensors[key]
        tensors[key] = (_next_inputs(kernel, layer.units) / c[None, :, None]).reshape(kernel.shape)
    return _to_vector(tensors, layout, vector.dtype)


def rescale(
    vector: np.ndarray,
    layout: WeightLayout,
    rng: np.random.Generator,
    *,
    activation: str,
    low: float = 0.5,
    high: float = 2.0,
) -> np.ndarray:
    """The vector of a ReLU net with every hidden unit rescaled by a random factor, log-uniform in
    [low, high] (same function); a ValueError for any other activation. The activation is not in
    the vector, so the caller names it (the net's `activation` param)."""
    _check_activation(activation)
    return apply_scales(vector, layout, random_scales(layout, rng, low, high), activation=activation)
