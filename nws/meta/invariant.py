"""A meta-classifier invariant to the renumbering of hidden units, by construction (issue 18).

Renumbering the units of a hidden layer (`nws.symmetry.permute`) leaves a net's function as it
is, so a prediction from weights should not change either. This model sees a net as sets of
units, in the manner of DeepSets (Zaheer et al., 2017) and of the neural functional networks
(Zhou et al., 2023) that pool over the permutation symmetries of weight spaces:

1. Per unit of every weight-owning layer, `UNIT_FEATURES`: statistics of its incoming weights
   (mean, std, min, quartiles, max, root mean square: a renumbering of the *previous* layer only
   reorders them), its bias, its batch-norm beta, gamma, moving mean and moving variance, and
   the layer's fan-in and width. Values are signed-log compressed, then standardised with the
   training units' mean and std.
2. phi, a small MLP shared by all units, then per layer the mean of phi and of its square over
   the layer's units (mean and second moment: a renumbering of this layer's units changes
   neither).
3. psi, a dense layer on each layer's pooled vector, then per *role* the mean over the role's
   layers. The roles are the first conv, the other convs, the hidden dense layers and the output
   layer: every net of the space has each role, with one to four layers in it, so the model has a
   fixed shape for all 243 architectures. Pooling per role rather than padding to the deepest net
   keeps what differs in kind (the image-facing conv, the logit layer) apart without tying a
   weight to "the third dense layer", which half the architectures lack.
4. rho, an MLP on the four role vectors and the architecture's six numbers, to the class logits
   (or the learning rate, scaled to [0, 1] by `Task.scale`, with an L1 loss).

Every pooling is a product with a fixed matrix (`Dot` layers): the per-layer and per-role means
over a padded set of `MAX_UNITS` units are inputs built from the architecture, which the vector's
length names (`architecture_for_length`). The region setting keeps the conv roles ("conv"), the
dense and output roles ("fc") or all four.

Saved as `invariant.keras` (checked against `KERAS_OBJECTS` and read in Keras' safe mode, as the
DMC) and `invariant.json` (the feature standardisation); nothing runs code from the files.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nws import interrupts
from nws.cnn import layer_plan
from nws.errors import DataError
from nws.meta.models import MetaClassifier, one_line  # moves to nws.meta.base
from nws.meta.samples import Samples
from nws.snapshots import weight_layout
from nws.space import BY_NAME, NetConfig

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
PHI = (64, 64)
PSI = 64
RHO = (128, 64)
PREDICT_BATCH = 256
FEATURE_CHUNK = 32
"""Vectors whose features are computed at once (float64 copies of 32 of the largest nets: 100 MB)."""
MODEL_FILE = "invariant.keras"
FEATURES_FILE = "invariant.json"
FEATURES_FORMAT = "nws-invariant-features-v1"
KERAS_OBJECTS = frozenset({
    "keras.src.models.functional.Functional", "keras.layers.InputLayer", "keras.layers.Dense",
    "keras.layers.Multiply", "keras.layers.Dot", "keras.layers.Concatenate", "keras.layers.Flatten",
    "keras.DTypePolicy", "keras.initializers.GlorotUniform", "keras.initializers.Zeros",
    "keras.optimizers.Adam", "keras.losses.SparseCategoricalCrossentropy",
    "keras.losses.MeanAbsoluteError", "__keras_tensor__",
})  # fmt: skip
"""Every object (module.class) the config of a saved invariant model names (Keras 3.15)."""


@functools.lru_cache(maxsize=1)
def _configs_by_length() -> dict[int, NetConfig]:
    """n_weights -> a configuration of that architecture, for every architecture of the space.
    Lengths are unique within batch norm on and within off; the two lengths they share go to
    batch norm on (the only setting the study draws), as in `nws.snapshots.conv_size_for_length`."""
    configs: dict[int, NetConfig] = {}
    options = [BY_NAME[name].options for name in ARCHITECTURE_FEATURES]
    for batch_norm in ("off", "on"):
        for values in itertools.product(*options):
            config = NetConfig("mnist", 0.001, 32, batch_norm, "off", "adam", "relu", "normal", *values)
            configs[weight_layout(config).n_weights] = config
    return configs


def architecture_for_length(n_weights: int) -> NetConfig:
    """A configuration with the architecture (and batch norm) of a flat vector of this length;
    its other properties are placeholders."""
    try:
        return _configs_by_length()[n_weights]
    except KeyError:
        raise ValueError(f"no architecture of the NWS space has {n_weights} weights") from None


@functools.lru_cache(maxsize=1)
def max_units() -> int:
    """The most units (all weight-owning layers together) of any net of the space."""
    return max(sum(spec.units for spec in layer_plan(c)) for c in _configs_by_length().values())


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


def build_invariant(n_outputs: int) -> Any:
    """The Keras model: phi per unit, mean and second moment per layer, psi per layer, mean per
    role, rho. Inputs: `units` [MAX_UNITS, features], `layer_pool` [SLOTS, MAX_UNITS], `role_pool`
    [roles, SLOTS], `architecture` [6]."""
    import keras
    from keras import layers

    units = keras.Input((max_units(), len(UNIT_FEATURES)), name="units")
    layer_pool = keras.Input((SLOTS, max_units()), name="layer_pool")
    role_pool = keras.Input((len(ROLES), SLOTS), name="role_pool")
    architecture = keras.Input((len(ARCHITECTURE_FEATURES) + 1,), name="architecture")
    x = units
    for i, width in enumerate(PHI, start=1):
        x = layers.Dense(width, activation="relu", name=f"phi{i}")(x)
    square = layers.Multiply(name="phi_squared")([x, x])
    mean = layers.Dot(axes=(2, 1), name="layer_mean")([layer_pool, x])
    moment = layers.Dot(axes=(2, 1), name="layer_second_moment")([layer_pool, square])
    per_layer = layers.Concatenate(name="layer_pooled")([mean, moment])
    per_layer = layers.Dense(PSI, activation="relu", name="psi")(per_layer)
    per_role = layers.Dot(axes=(2, 1), name="role_mean")([role_pool, per_layer])
    z = layers.Concatenate(name="net")([layers.Flatten(name="roles")(per_role), architecture])
    for i, width in enumerate(RHO, start=1):
        z = layers.Dense(width, activation="relu", name=f"rho{i}")(z)
    outputs = layers.Dense(n_outputs, name="output", dtype="float32")(z)
    return keras.Model([units, layer_pool, role_pool, architecture], outputs, name="invariant")


class InvariantModel(MetaClassifier):
    """A DeepSets meta-classifier over the units of whole snapshots of any architectures."""

    name = "invariant"
    uses_slices = False

    model: Any = None
    feature_mean: np.ndarray | None = None
    feature_std: np.ndarray | None = None

    def _inputs(self, table: UnitTable, index: np.ndarray) -> dict[str, np.ndarray]:
        """The model's padded inputs for the listed vectors of a table."""
        assert self.feature_mean is not None and self.feature_std is not None
        units = np.zeros((len(index), max_units(), len(UNIT_FEATURES)), np.float32)
        templates = [template(int(table.n_weights[i]), self.settings.region) for i in index]
        for row, (i, t) in enumerate(zip(index, templates, strict=True)):
            start = table.start[i]
            units[row, : t.n_units] = (table.features[start : start + t.n_units] - self.feature_mean) / (
                self.feature_std
            )
        return {
            "units": units,
            "layer_pool": np.stack([t.layer_pool for t in templates]),
            "role_pool": np.stack([t.role_pool for t in templates]),
            "architecture": np.stack([t.architecture for t in templates]),
        }

    def _targets(self, labels: np.ndarray) -> np.ndarray:
        if self.task.is_regression:
            return self.task.scale(labels).astype(np.float32)
        return np.asarray(labels, np.int64)

    def _batches(
        self, table: UnitTable, targets: np.ndarray, batch: int, rng: np.random.Generator | None
    ) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
        """Endless batches: shuffled, full ones with `rng`; in order, every vector once per pass
        without (for validation)."""
        while True:
            order = rng.permutation(len(table)) if rng is not None else np.arange(len(table))
            stop = len(order) - batch + 1 if rng is not None else len(order)
            for start in range(0, stop, batch):
                index = order[start : start + batch]
                yield self._inputs(table, index), targets[index]

    def fit(self, train: Samples, valid: Samples) -> None:
        self.fit_vectors(_snapshots(train), train.label, _snapshots(valid), valid.label)

    def fit_vectors(
        self,
        vectors: Sequence[np.ndarray] | np.ndarray,
        labels: np.ndarray,
        valid_vectors: Sequence[np.ndarray] | np.ndarray = (),
        valid_labels: np.ndarray | None = None,
    ) -> None:
        """Train on whole flat vectors (any architectures of the space) and their labels (class
        indices, or learning rates); the validation vectors are for monitoring."""
        with interrupts.deferred():  # a stop is raised between two steps (interrupts.between_steps)
            self._fit(UnitTable.of(vectors), np.asarray(labels), valid_vectors, valid_labels)

    def _fit(self, table: UnitTable, labels: np.ndarray, valid_vectors: Any, valid_labels: Any) -> None:
        import keras

        if not len(table):
            raise ValueError("invariant: no training vectors")
        keras.utils.set_random_seed(self.settings.seed)
        self.feature_mean = table.features.mean(axis=0)
        std = table.features.std(axis=0)
        self.feature_std = np.where(std > 1e-6, std, 1.0).astype(np.float32)
        n_outputs = 1 if self.task.is_regression else len(self.task.classes)
        self.model = build_invariant(n_outputs)
        if self.task.is_regression:
            loss, metrics = keras.losses.MeanAbsoluteError(), []
        else:
            loss, metrics = keras.losses.SparseCategoricalCrossentropy(from_logits=True), ["accuracy"]
        self.model.compile(
            optimizer=keras.optimizers.Adam(self.settings.learning_rate), loss=loss, metrics=metrics
        )
        batch = min(self.settings.batch_size, len(table))
        validation, validation_steps = None, None
        if len(valid_vectors):
            valid = UnitTable.of(valid_vectors)
            validation = self._batches(valid, self._targets(np.asarray(valid_labels)), batch, None)
            validation_steps = math.ceil(len(valid) / batch)
        rng = np.random.default_rng(self.settings.seed)
        history = self.model.fit(
            self._batches(table, self._targets(labels), batch, rng),
            epochs=self.settings.epochs,
            steps_per_epoch=len(table) // batch,
            validation_data=validation,
            validation_steps=validation_steps,
            callbacks=[interrupts.between_steps()],
            shuffle=False,  # the batches are shuffled already
            verbose=0,
        )
        self.history = {k: [float(v) for v in vs] for k, vs in history.history.items()}

    def predict_snapshots(self, vectors: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
        """Class probabilities [n, C], or learning rates [n], from whole flat vectors; a 2-D array
        of one architecture or a sequence of vectors of any lengths of the space."""
        import keras

        table = UnitTable.of(vectors)
        outputs = []
        with interrupts.deferred():
            for start in range(0, len(table), PREDICT_BATCH):
                index = np.arange(start, min(start + PREDICT_BATCH, len(table)))
                outputs.append(keras.ops.convert_to_numpy(self.model(self._inputs(table, index))))
        n_outputs = 1 if self.task.is_regression else len(self.task.classes)
        out = np.concatenate(outputs).astype(np.float64) if outputs else np.zeros((0, n_outputs))
        if self.task.is_regression:
            return self.task.unscale(out[:, 0])
        out = np.exp(out - out.max(axis=1, keepdims=True))
        return out / out.sum(axis=1, keepdims=True)

    def _save_model(self, directory: Path) -> None:
        assert self.feature_mean is not None and self.feature_std is not None
        self.model.save(directory / MODEL_FILE)
        document = {
            "format": FEATURES_FORMAT,
            "unit_features": list(UNIT_FEATURES),
            "mean": [float(v) for v in self.feature_mean],
            "std": [float(v) for v in self.feature_std],
        }
        (directory / FEATURES_FILE).write_text(json.dumps(document, indent=1))

    def _load_model(self, directory: Path) -> None:
        import keras

        try:
            document = json.loads((directory / FEATURES_FILE).read_text(encoding="utf-8"))
            if document["format"] != FEATURES_FORMAT or document["unit_features"] != list(UNIT_FEATURES):
                raise ValueError("written for other unit features")
            mean = np.array(document["mean"], np.float32)
            std = np.array(document["std"], np.float32)
            if mean.shape != std.shape or mean.shape != (len(UNIT_FEATURES),):
                raise ValueError(f"{len(UNIT_FEATURES)} means and stds expected")
            if not (np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()):
                raise ValueError("means must be finite and stds positive")
        except (OSError, ValueError, KeyError, TypeError) as e:  # incl. bad JSON and UnicodeDecodeError
            raise DataError(f"{FEATURES_FILE}: not an invariant model's features ({one_line(e)})") from None
        path = directory / MODEL_FILE
        try:
            with zipfile.ZipFile(path) as archive:
                strangers = sorted(
                    set(_named_objects(json.loads(archive.read("config.json")))) - KERAS_OBJECTS
                )
        except (OSError, zipfile.BadZipFile, KeyError, ValueError, RecursionError) as e:
            raise DataError(f"{MODEL_FILE}: not a Keras archive ({one_line(e)})") from None
        if strangers:
            raise DataError(
                f"{MODEL_FILE}: names objects an invariant model is not made of: {', '.join(strangers)}"
            )
        try:
            # Explicit safe mode, and no compile: prediction needs neither optimizer nor loss.
            model = keras.models.load_model(path, compile=False, safe_mode=True)
        except Exception as e:  # Keras' reader of untrusted input: any failure means a bad file
            raise DataError(f"{MODEL_FILE}: cannot be loaded ({one_line(e)})") from None
        n_outputs = 1 if self.task.is_regression else len(self.task.classes)
        expected = (
            [(None, max_units(), len(UNIT_FEATURES)), (None, SLOTS, max_units()), (None, len(ROLES), SLOTS),
             (None, len(ARCHITECTURE_FEATURES) + 1)],
            [(None, n_outputs)],
        )  # fmt: skip
        if ([tuple(t.shape) for t in model.inputs], [tuple(t.shape) for t in model.outputs]) != expected:
            raise DataError(f"{MODEL_FILE}: inputs or outputs are not those of this task's invariant model")
        self.model, self.feature_mean, self.feature_std = model, mean, std


def _snapshots(samples: Samples) -> list[np.ndarray]:
    return [samples.zoo.snapshot(n, k) for n, k in zip(samples.net, samples.k, strict=True)]


def _named_objects(node: Any) -> Iterator[str]:
    """`module.class` of every object a Keras config names, however deeply nested."""
    if isinstance(node, dict):
        if "class_name" in node:
            yield ".".join(str(part) for part in (node.get("module"), node["class_name"]) if part is not None)
        node = list(node.values())
    if isinstance(node, list):
        for value in node:
            yield from _named_objects(value)
