"""A meta-classifier invariant to the renumbering of hidden units, by construction (issue 18).

Renumbering the units of a hidden layer (`nws.net.symmetry.permute`) leaves a net's function as it
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
dense and output roles ("fc") or all four ("all"; "nonkernel": all four, each unit read from its
bias and batch norm only, its kernel features zeroed).

Saved as `invariant.keras` (checked against `KERAS_OBJECTS` and read in Keras' safe mode, as the
DMC) and `invariant.json` (the feature standardisation); nothing runs code from the files.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nws import backend, interrupts
from nws.errors import DataError, one_line
from nws.meta.base import MetaClassifier
from nws.meta.keras_archive import load_checked, save_keras
from nws.meta.samples import Samples
from nws.meta.unit_features import (
    ARCHITECTURE_FEATURES,
    KERNEL_FEATURES,
    ROLES,
    SLOTS,
    UNIT_FEATURES,
    UnitTable,
    max_units,
    template,
)
from nws.progress import Steps

PHI = (64, 64)
PSI = 64
RHO = (128, 64)
PREDICT_BATCH = 256
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
        templates = [template(int(table.n_weights[i]), self.settings.region, self.layout) for i in index]
        for row, (i, t) in enumerate(zip(index, templates, strict=True)):
            start = table.start[i]
            units[row, : t.n_units] = (table.features[start : start + t.n_units] - self.feature_mean) / (
                self.feature_std
            )
        if self.settings.region == "nonkernel":  # standardised, so 0 says nothing
            units[:, :, : len(KERNEL_FEATURES)] = 0.0
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
            self._fit(UnitTable.of(vectors, self.layout), np.asarray(labels), valid_vectors, valid_labels)

    def _fit(self, table: UnitTable, labels: np.ndarray, valid_vectors: Any, valid_labels: Any) -> None:
        import keras

        if not len(table):
            raise ValueError("invariant: no training vectors")
        backend.seed(self.settings.seed)
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
            valid = UnitTable.of(valid_vectors, self.layout)
            validation = self._batches(valid, self._targets(np.asarray(valid_labels)), batch, None)
            validation_steps = math.ceil(len(valid) / batch)
        rng = np.random.default_rng(self.settings.seed)
        epochs = Steps(f"{self.task.prop} / invariant training", self.settings.epochs, "epochs")
        with epochs:
            history = self.model.fit(
                self._batches(table, self._targets(labels), batch, rng),
                epochs=self.settings.epochs,
                steps_per_epoch=len(table) // batch,
                validation_data=validation,
                validation_steps=validation_steps,
                callbacks=[interrupts.between_steps(), epochs.keras_callback()],
                shuffle=False,  # the batches are shuffled already
                verbose=0,
            )
        self.history = {k: [float(v) for v in vs] for k, vs in history.history.items()}

    def predict_snapshots(self, vectors: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
        """Class probabilities [n, C], or learning rates [n], from whole flat vectors; a 2-D array
        of one architecture or a sequence of vectors of any lengths of the space."""
        import keras

        table = UnitTable.of(vectors, self.layout)
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
        save_keras(self.model, directory / MODEL_FILE, self.settings.save_optimizer)
        document = {
            "format": FEATURES_FORMAT,
            "unit_features": list(UNIT_FEATURES),
            "mean": [float(v) for v in self.feature_mean],
            "std": [float(v) for v in self.feature_std],
        }
        (directory / FEATURES_FILE).write_text(json.dumps(document, indent=1))

    def _load_model(self, directory: Path) -> None:
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
        model = load_checked(directory / MODEL_FILE, KERAS_OBJECTS, "an invariant model")
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
