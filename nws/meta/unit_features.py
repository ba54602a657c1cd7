"""A net as sets of units: per unit of every weight-owning layer, features that a renumbering of
the layer's units only reorders (`UNIT_FEATURES`), and per architecture the fixed matrices that
average them per layer and per role: what `nws.meta.invariant` pools (numpy only).

The roles are the first conv, the other convs, the hidden dense layers and the output layer:
every net of the space has each role, with one to four layers in it, so a model built on roles
has one shape for all 243 architectures. A vector's architecture follows from its length
(`nws.snapshots.architecture_for_length`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from nws.cnn import layer_plan
from nws.snapshots import architecture_for_length, architectures, weight_layout
from nws.space import BY_NAME

ARCHITECTURE_FEATURES = ("filter_size", "depth_conv", "depth_fc", "width_conv", "width_fc")
MAX_CONV = max(BY_NAME["depth_conv"].options)
MAX_DENSE = max(BY_NAME["depth_fc"].options)
SLOTS = MAX_CONV + MAX_DENSE + 1
"""Layer slots: convs 0..4, hidden dense layers 5..8, the output layer 9."""
ROLES = ("first_conv", "conv", "dense", "output")
REGION_ROLES = {"all": ROLES, "conv": ("first_conv", "conv"), "fc": ("dense", "output")}
UNIT_FEATURES = (
    "in_mean", "in_std", "in_min", "in_q25", "in_median", "in_q75", "in_max", "in_rms",
    "bias", "beta", "gamma", "moving_mean", "moving_variance",
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


@functools.cache
def template(n_weights: int, region: str = "all") -> Template:
    """The template of the architecture with `n_weights` weights."""
    config = architecture_for_length(n_weights)
    layout = weight_layout(config)
    entries = {(e.layer, e.tensor): slice(e.offset, e.stop) for e in layout}
    layers, convs, denses = [], 0, 0
    for spec in layer_plan(config):
        if spec.kind == "conv":
            slot, role, convs = convs, "first_conv" if convs == 0 else "conv", convs + 1
        elif spec.kind == "dense":
            slot, role, denses = MAX_CONV + denses, "dense", denses + 1
        else:
            slot, role = SLOTS - 1, "output"
        norm = ("beta", "gamma", "moving_mean", "moving_variance") if spec.batch_norm else ()
        layers.append(
            _Layer(
                slot, role, spec.units, math.prod(spec.kernel_shape[:-1]), entries[(spec.name, "kernel")],
                entries[(spec.name, "bias")], tuple(entries[(spec.name, t)] for t in norm),
            )
        )  # fmt: skip
    layer_pool = np.zeros((SLOTS, max_units()), np.float32)
    start = 0
    for layer in layers:
        layer_pool[layer.slot, start : start + layer.units] = 1.0 / layer.units
        start += layer.units
    role_pool = np.zeros((len(ROLES), SLOTS), np.float32)
    for r, role in enumerate(ROLES):
        if role in REGION_ROLES[region]:
            slots = [layer.slot for layer in layers if layer.role == role]
            role_pool[r, slots] = 1.0 / len(slots)
    architecture = np.array(
        [getattr(config, name) / max(BY_NAME[name].options) for name in ARCHITECTURE_FEATURES]
        + [float(config.batch_norm == "on")],
        np.float32,
    )
    return Template(tuple(layers), start, layer_pool, role_pool, architecture)


def _compress(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.log1p(np.abs(x))


def unit_features(vectors: np.ndarray) -> np.ndarray:
    """[n, units, len(UNIT_FEATURES)] features of the units of n vectors of one architecture, in
    layer order (the order of the template's `layer_pool` columns)."""
    vectors = np.atleast_2d(np.asarray(vectors, np.float64))
    n = len(vectors)
    parts = []
    for layer in template(vectors.shape[1]).layers:
        # Storage order puts a unit's incoming weights next to each other (nws.snapshots).
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
    def of(cls, vectors: Sequence[np.ndarray] | np.ndarray) -> UnitTable:
        vectors = [np.asarray(v, np.float32).ravel() for v in vectors]
        lengths = np.array([len(v) for v in vectors], np.int64)
        for length in np.unique(lengths):
            architecture_for_length(int(length))  # a clear error before any work
        counts = np.array([template(int(length)).n_units for length in lengths], np.int64)
        start = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        features = np.empty((int(counts.sum()), len(UNIT_FEATURES)), np.float32)
        for length in np.unique(lengths):
            members = np.flatnonzero(lengths == length)
            for chunk in np.array_split(members, math.ceil(len(members) / FEATURE_CHUNK)):
                values = unit_features(np.stack([vectors[i] for i in chunk]))
                for i, rows in zip(chunk, values, strict=True):
                    features[start[i] : start[i] + len(rows)] = rows
        return cls(features, start, lengths)

    def __len__(self) -> int:
        return len(self.start)
