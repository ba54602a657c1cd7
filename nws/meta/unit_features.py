"""A net as sets of units: per unit of every weight-owning layer, features that a renumbering of
the layer's units only reorders (`UNIT_FEATURES`), and per architecture the fixed matrices that
average them per layer and per role: what `nws.meta.invariant` pools (numpy only).

The roles are the first conv, the other convs, the hidden dense layers and the output layer:
every net of the space has each role, with one to four layers in it, so a model built on roles
has one shape for all 243 architectures. A vector's architecture follows from its length
(`nws.net.snapshots.architecture_for_length`); a vector outside the NWS family (an imported zoo's)
comes with its layout, whose kernels name the layers (a zoo without hidden dense layers leaves
that role empty).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from nws.net.cnn import layer_plan
from nws.net.snapshots import WeightLayout, architecture_for_length, architectures, weight_layout
from nws.space import BY_NAME

ARCHITECTURE_FEATURES = ("filter_size", "depth_conv", "depth_fc", "width_conv", "width_fc")
MAX_CONV = max(BY_NAME["depth_conv"].options)
MAX_DENSE = max(BY_NAME["depth_fc"].options)
SLOTS = MAX_CONV + MAX_DENSE + 1
"""Layer slots: convs 0..4, hidden dense layers 5..8, the output layer 9."""
ROLES = ("first_conv", "conv", "dense", "output")
REGION_ROLES = {"all": ROLES, "conv": ("first_conv", "conv"), "fc": ("dense", "output"), "nonkernel": ROLES}
KERNEL_FEATURES = ("in_mean", "in_std", "in_min", "in_q25", "in_median", "in_q75", "in_max", "in_rms")
"""A unit's features read from its kernel: the `nonkernel` region leaves them out (zeroed)."""
UNIT_FEATURES = (
    *KERNEL_FEATURES, "bias", "beta", "gamma", "moving_mean", "moving_variance",
    "has_batch_norm", "log2_fan_in", "log2_units",
)  # fmt: skip
"""Per unit; the first 13 are weight values, compressed by sign(x) log(1 + |x|)."""
FEATURE_CHUNK = 32
"""Vectors whose features are computed at once (float64 copies of 32 of the largest nets: 100 MB)."""


@functools.lru_cache(maxsize=1)
def max_units() -> int:
    """The most units (all weight-owning layers together) of any net of the space."""
    return max(sum(spec.units for spec in layer_plan(c)) for c in architectures())


@dataclass(frozen=True)
class _Layer:
    slot: int
    role: str
    units: int
    fan_in: int
    kernel: slice
    bias: slice
    batch_norm: tuple[slice, ...]  # beta, gamma, moving mean, moving variance; () without


@dataclass(frozen=True)
class Template:
    """What the model needs of one architecture besides the weights."""

    layers: tuple[_Layer, ...]
    n_units: int
    layer_pool: np.ndarray  # [SLOTS, MAX_UNITS]: row s averages the units of the layer in slot s
    role_pool: np.ndarray  # [len(ROLES), SLOTS]: row r averages the slots of role r
    architecture: np.ndarray  # [len(ARCHITECTURE_FEATURES) + 1]


def _nws_layers(n_weights: int) -> tuple[list[tuple[str, int, int, str]], WeightLayout, np.ndarray]:
    """(kind, units, fan_in, layer name) per weight-owning layer of the NWS architecture of this
    length, its layout and its architecture numbers."""
    config = architecture_for_length(n_weights)
    kinds = [
        (spec.kind, spec.units, math.prod(spec.kernel_shape[:-1]), spec.name) for spec in layer_plan(config)
    ]
    architecture = np.array(
        [getattr(config, name) / max(BY_NAME[name].options) for name in ARCHITECTURE_FEATURES]
        + [float(config.batch_norm == "on")],
        np.float32,
    )
    return kinds, weight_layout(config), architecture


def _foreign_layers(layout: WeightLayout) -> tuple[list[tuple[str, int, int, str]], WeightLayout, np.ndarray]:
    """The same for a layout outside the NWS family (an imported zoo's): a 4-D kernel makes a
    conv, a 2-D one a dense layer, the last one the output; the architecture numbers are those
    the NWS family would give (kernel size, conv and dense counts, mean widths, batch norm)."""
    kernels = [e for e in layout if e.tensor == "kernel"]
    kinds = [("conv" if len(e.shape) == 4 else "dense", e.shape[-1], math.prod(e.shape[:-1]), e.layer)
             for e in kernels]  # fmt: skip
    if kinds:
        kinds[-1] = ("output", *kinds[-1][1:])
    convs = [k for k in kinds if k[0] == "conv"]
    dense = [k for k in kinds if k[0] == "dense"]
    if not convs or len(convs) > MAX_CONV or len(dense) > MAX_DENSE or sum(k[1] for k in kinds) > max_units():
        raise ValueError(
            f"the invariant model takes 1-{MAX_CONV} convs, up to {MAX_DENSE} hidden dense layers and "
            f"{max_units()} units; this layout has {len(convs)}, {len(dense)} and {sum(k[1] for k in kinds)}"
        )
    filter_size = kernels[0].shape[0]
    numbers = [filter_size, len(convs), len(dense) + 1, np.mean([k[1] for k in convs]),
               np.mean([k[1] for k in dense]) if dense else 0.0]  # fmt: skip
    architecture = [v / max(BY_NAME[n].options) for v, n in zip(numbers, ARCHITECTURE_FEATURES, strict=True)]
    batch_norm = float(any(e.tensor == "gamma" for e in layout))
    return kinds, layout, np.array([*architecture, batch_norm], np.float32)


@functools.cache
def template(n_weights: int, region: str = "all", layout: WeightLayout | None = None) -> Template:
    """The template of the architecture with `n_weights` weights: the NWS family's of that
    length, else that of `layout` (the zoo's own, for an imported zoo) when its length matches."""
    try:
        kinds, layout, architecture = _nws_layers(n_weights)
    except ValueError:
        if layout is None or layout.n_weights != n_weights:
            raise
        kinds, layout, architecture = _foreign_layers(layout)
    entries = {(e.layer, e.tensor): slice(e.offset, e.stop) for e in layout}
    layers, convs, denses = [], 0, 0
    for kind, units, fan_in, name in kinds:
        if kind == "conv":
            slot, role, convs = convs, "first_conv" if convs == 0 else "conv", convs + 1
        elif kind == "dense":
            slot, role, denses = MAX_CONV + denses, "dense", denses + 1
        else:
            slot, role = SLOTS - 1, "output"
        norm = ("beta", "gamma", "moving_mean", "moving_variance") if (name, "gamma") in entries else ()
        layers.append(
            _Layer(slot, role, units, fan_in, entries[(name, "kernel")], entries[(name, "bias")],
                   tuple(entries[(name, t)] for t in norm))
        )  # fmt: skip
    layer_pool = np.zeros((SLOTS, max_units()), np.float32)
    start = 0
    for layer in layers:
        layer_pool[layer.slot, start : start + layer.units] = 1.0 / layer.units
        start += layer.units
    role_pool = np.zeros((len(ROLES), SLOTS), np.float32)
    for r, role in enumerate(ROLES):
        slots = [layer.slot for layer in layers if layer.role == role]
        if role in REGION_ROLES[region] and slots:  # an imported zoo's net may have no hidden dense layer
            role_pool[r, slots] = 1.0 / len(slots)
    return Template(tuple(layers), start, layer_pool, role_pool, architecture)


def _compress(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.log1p(np.abs(x))


def unit_features(vectors: np.ndarray, layout: WeightLayout | None = None) -> np.ndarray:
    """[n, units, len(UNIT_FEATURES)] features of the units of n vectors of one architecture, in
    layer order (the order of the template's `layer_pool` columns)."""
    vectors = np.atleast_2d(np.asarray(vectors, np.float64))
    n = len(vectors)
    parts = []
    for layer in template(vectors.shape[1], "all", layout).layers:
        # Storage order puts a unit's incoming weights next to each other (nws.net.snapshots).
        incoming = vectors[:, layer.kernel].reshape(n, layer.units, layer.fan_in)
        columns = [incoming.mean(axis=-1), incoming.std(axis=-1)]
        columns += list(np.quantile(incoming, (0.0, 0.25, 0.5, 0.75, 1.0), axis=-1))
        columns.append(np.sqrt((incoming**2).mean(axis=-1)))
        columns.append(vectors[:, layer.bias])
        if layer.batch_norm:
            columns += [vectors[:, part] for part in layer.batch_norm]
        else:
            columns += [np.zeros((n, layer.units))] * 4
        values = _compress(np.stack(columns, axis=-1))
        sizes = [float(bool(layer.batch_norm)), math.log2(layer.fan_in), math.log2(layer.units)]
        constant = np.broadcast_to(np.array(sizes), (n, layer.units, len(sizes)))
        parts.append(np.concatenate([values, constant], axis=-1))
    return np.concatenate(parts, axis=1).astype(np.float32)


@dataclass
class UnitTable:
    """The unit features of many vectors (of any architectures), packed without padding."""

    features: np.ndarray  # [all units, len(UNIT_FEATURES)]
    start: np.ndarray  # per vector, its first row
    n_weights: np.ndarray  # per vector, its length (the architecture)

    @classmethod
    def of(cls, vectors: Sequence[np.ndarray] | np.ndarray, layout: WeightLayout | None = None) -> UnitTable:
        """`layout`: the architecture of vectors outside the NWS family (an imported zoo's)."""
        vectors = [np.asarray(v, np.float32).ravel() for v in vectors]
        lengths = np.array([len(v) for v in vectors], np.int64)
        for length in np.unique(lengths):
            template(int(length), "all", layout)  # a clear error before any work
        counts = np.array([template(int(length), "all", layout).n_units for length in lengths], np.int64)
        start = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        features = np.empty((int(counts.sum()), len(UNIT_FEATURES)), np.float32)
        for length in np.unique(lengths):
            members = np.flatnonzero(lengths == length)
            for chunk in np.array_split(members, math.ceil(len(members) / FEATURE_CHUNK)):
                values = unit_features(np.stack([vectors[i] for i in chunk]), layout)
                for i, rows in zip(chunk, values, strict=True):
                    features[start[i] : start[i] + len(rows)] = rows
        return cls(features, start, lengths)

    def __len__(self) -> int:
        return len(self.start)
