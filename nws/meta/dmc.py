"""The deep meta-classifier (DMC) of the paper: a 1D CNN on raw weight slices.

Conv1D layers with kernel 5, each conv -> ReLU -> batch norm; channels 8, 16, 32, 64, 128, 256
with 2x max-pooling in between, then further 256-channel layers (pooling only while the length is
above 50) until about 20 positions remain: at a slice length of 5,000 the flattened size is
19 x 256, and longer slices get more layers. Head: dense 1024 x 4 and 64, each ReLU -> batch norm
-> dropout 0.5, then the output.

Saved as a `.keras` archive. Loading checks every object its config names against those a DMC is
made of (`KERAS_OBJECTS`) before Keras reads it, then loads it in Keras' safe mode, so a crafted
archive (a Lambda layer's code, a function of another module) is refused rather than run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nws import backend, interrupts
from nws.meta.base import MetaClassifier, MetaSettings
from nws.meta.keras_archive import load_checked, save_keras
from nws.meta.samples import Samples
from nws.progress import Steps

KERNEL = 5
HEAD = (1024, 1024, 1024, 1024, 64)
DROPOUT = 0.5
BN_MOMENTUM = 0.9
"""As the original (TensorLayer's BatchNormLayer decay); Keras' 0.99 leaves the moving statistics
near their initial values for the first hundreds of steps."""
RECALIBRATION_BATCHES = 10
COSINE_FLOOR = 0.01
"""The learning rate's end of the steps budget, as a fraction of its peak."""
MIN_EXTRA_LAYERS = 6
POOL_WHILE_ABOVE = 50
MODEL_FILE = "dmc.keras"
KERAS_OBJECTS = frozenset({
    "keras.src.models.functional.Functional", "keras.layers.InputLayer", "keras.layers.Reshape",
    "keras.layers.Conv1D", "keras.layers.Rescaling", "keras.optimizers.schedules.CosineDecay",
    "keras.layers.Activation", "keras.layers.BatchNormalization",
    "keras.layers.MaxPooling1D", "keras.layers.Flatten", "keras.layers.Dense", "keras.layers.Dropout",
    "keras.DTypePolicy", "keras.initializers.GlorotUniform", "keras.initializers.Zeros",
    "keras.initializers.Ones", "keras.optimizers.Adam", "keras.losses.SparseCategoricalCrossentropy",
    "keras.losses.MeanAbsoluteError", "__keras_tensor__",
})  # fmt: skip
"""Every object (module.class) the config of a saved DMC names (Keras 3.15)."""


def conv_plan(length: int) -> list[tuple[int, bool]]:
    """(channels, pool after) for each conv layer at this input length."""
    plan = [(8, True), (16, True), (32, False), (64, True), (128, False), (256, False)]
    size = length
    for _, pool in plan:
        size = size // 2 if pool and size >= 2 else size
    extra = 0
    while extra < MIN_EXTRA_LAYERS or size > POOL_WHILE_ABOVE:
        if size > POOL_WHILE_ABOVE:
            plan[-1] = (plan[-1][0], True)
            size //= 2
        plan.append((256, False))
        extra += 1
    if size >= 2:
        plan[-1] = (256, True)  # the final pooling
    return plan


def build_dmc(length: int, n_outputs: int, scale: float | None = None) -> Any:
    """The DMC for slices of `length`. A `scale` multiplies its inputs, then softsign squashes
    them, x / (1 + |x|): monotonic, so nothing is lost, but a slice's rare large
    weights (a batch-norm variance of the net, say) no longer set a batch's statistics. Without
    it, batch norm's moving statistics average batches that such outliers dominate, and the DMC
    that is right in training mode predicts one class at inference (measured on the positive
    control). Both are layers of the saved model, so a loaded DMC sees inputs as it was trained."""
    import keras
    from keras import layers

    inputs = keras.Input(shape=(length,), name="weights")
    x = inputs
    if scale is not None:
        x = layers.Rescaling(scale, name="input_scale")(x)
        x = layers.Activation("softsign", name="input_tails")(x)
    x = layers.Reshape((length, 1), name="as_sequence")(x)
    for i, (channels, pool) in enumerate(conv_plan(length), start=1):
        x = layers.Conv1D(channels, KERNEL, padding="same", name=f"conv{i}")(x)
        x = layers.Activation("relu", name=f"conv{i}_relu")(x)
        x = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"conv{i}_bn")(x)
        if pool:
            x = layers.MaxPooling1D(2, name=f"pool{i}")(x)
    x = layers.Flatten(name="flatten")(x)
    for i, units in enumerate(HEAD, start=1):
        x = layers.Dense(units, name=f"fc{i}")(x)
        x = layers.Activation("relu", name=f"fc{i}_relu")(x)
        x = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"fc{i}_bn")(x)
        x = layers.Dropout(DROPOUT, name=f"fc{i}_dropout")(x)
    outputs = layers.Dense(n_outputs, name="output", dtype="float32")(x)
    return keras.Model(inputs, outputs, name="dmc")


def slice_batches(samples: Samples, batch_size: int, seed: int, plan: Budget) -> Any:
    """The batches of (slices, targets) of `plan`'s epochs for Keras on any backend, a new random
    slice for every sample of every batch (`Samples.batch`), made ahead of the training step."""

    def make(index: int) -> tuple[np.ndarray, np.ndarray]:
        x, y = samples.batch(index, batch_size, seed)
        return x.astype(np.float32), (y.astype(np.float32) if y.dtype.kind == "f" else y.astype(np.int64))

    return backend.made_batches(make, plan.epochs, plan.steps_per_epoch)


VALIDATION_SLICES = 16
"""Evenly spaced slices per validation snapshot: the validation loss that picks the DMC's weights
is then a per-net judgement, not one random slice's."""
MAX_VALIDATION_SLICES = 4096  # fewer per snapshot on a big zoo (NWS: ~1,600 nets x 10 snapshots)
SCALE_SLICES = 8  # random slices per training sample that set the input scale


@dataclass(frozen=True)
class Budget:
    """How the DMC trains: Keras epochs of `steps_per_epoch` optimizer steps, validated after each."""

    epochs: int
    steps_per_epoch: int

    @property
    def steps(self) -> int:
        return self.epochs * self.steps_per_epoch


def budget(settings: MetaSettings, samples: int, batch: int) -> Budget:
    """The steps budget, in rounds of `validate_every` steps (the last round may be cut short by
    rounding the budget up to whole rounds); at steps=0 the paper's schedule, one Keras epoch per
    pass over the training samples, whose number of steps shrinks with the zoo."""
    if settings.steps:
        per_round = min(settings.validate_every, settings.steps)
        return Budget(-(-settings.steps // per_round), per_round)
    return Budget(settings.epochs, max(1, samples // batch))


def input_scale(train: Samples, seed: int) -> float:
    """1 / the typical size of the training slices' raw weights (the 75th percentile of |w|, which
    rare large weights do not move): a DMC input of unit size, so that the first layer's bias and
    batch norm's epsilon (1e-3) do not swamp weights of size ~0.01."""
    rng = np.random.default_rng(seed)
    slices = train.random_slices(rng.integers(0, len(train), min(4096, SCALE_SLICES * len(train))), rng)
    size = float(np.quantile(np.abs(slices), 0.75))
    return 1.0 / size if np.isfinite(size) and size > 0 else 1.0


def training_forward(model: Any) -> Any:
    """`model` in training mode behind Keras' own predict: batch norm uses and records each
    batch's statistics, compiled once, on any backend."""
    import keras

    class TrainingForward(keras.Model):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def call(self, x: Any) -> Any:
            return self.inner(x, training=True)

    return TrainingForward()


class DMC(MetaClassifier):
    name = "dmc"

    model: Any = None

    def _compile(self, scale: float | None = None, decay_steps: int = 0) -> None:
        """A fresh DMC, compiled: its inputs scaled by `scale` (None: raw, `build_dmc`), its
        learning rate cosine-decayed over `decay_steps` (0: constant)."""
        import keras

        n_outputs = 1 if self.task.is_regression else len(self.task.classes)
        self.model = build_dmc(self.settings.slice_length, n_outputs, scale)
        if self.task.is_regression:
            loss, metrics = keras.losses.MeanAbsoluteError(), []
        else:
            loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
            metrics = ["accuracy"]
        rate: Any = self.settings.learning_rate
        if decay_steps:
            rate = keras.optimizers.schedules.CosineDecay(rate, decay_steps=decay_steps, alpha=COSINE_FLOOR)
        self.model.compile(optimizer=keras.optimizers.Adam(rate), loss=loss, metrics=metrics)

    def _targets(self, samples: Samples) -> Samples:
        if not self.task.is_regression:
            return samples
        return dataclasses.replace(samples, label=self.task.scale(samples.label))

    def fit(self, train: Samples, valid: Samples) -> None:
        with interrupts.deferred():  # a stop is raised between two steps (interrupts.between_steps)
            self._fit(train, valid)

    def _validation(self, valid: Samples) -> Any:
        """Evenly spaced slices of every validation snapshot, with their targets, as batches."""
        valid = self._targets(valid)
        per = max(1, min(VALIDATION_SLICES, MAX_VALIDATION_SLICES // len(valid)))
        starts = valid.even_starts(per)
        slices = np.concatenate([valid.even_slices(i, starts[i]) for i in range(len(valid))])
        label = np.repeat(valid.label, per)
        label = label.astype(np.float32) if self.task.is_regression else label
        return backend.array_batches((slices, label), 256)

    def _fit(self, train: Samples, valid: Samples) -> None:
        import keras

        backend.seed(self.settings.seed)
        train = self._targets(train)
        batch = min(self.settings.batch_size, len(train))
        plan = budget(self.settings, len(train), batch)
        scale = input_scale(train, self.settings.seed + 3) if self.settings.normalize else None
        self._compile(scale, plan.steps if self.settings.steps else 0)
        validation = self._validation(valid) if len(valid) else None
        unit = f"rounds of {plan.steps_per_epoch} steps" if self.settings.steps else "epochs"
        progress = Steps(f"{self.task.prop} / dmc training", plan.epochs, unit)
        callbacks = [interrupts.between_steps(), progress.keras_callback()]
        best = None
        if self.settings.steps and validation is not None:
            # Keras keeps the weights of the best validation (`select_by`) and restores them at the
            # end, stopped early or not.
            by_accuracy = self.settings.select_by == "accuracy" and not self.task.is_regression
            best = keras.callbacks.EarlyStopping(
                monitor="val_accuracy" if by_accuracy else "val_loss",
                mode="max" if by_accuracy else "min",
                patience=self.settings.patience or plan.epochs,
                restore_best_weights=True,
            )
            callbacks.append(best)
        with progress:
            history = self.model.fit(
                slice_batches(train, batch, self.settings.seed, plan),
                epochs=plan.epochs,
                steps_per_epoch=plan.steps_per_epoch,
                validation_data=validation,
                callbacks=callbacks,
                shuffle=False,
                verbose=0,
            )
        self.history = {k: [float(v) for v in vs] for k, vs in history.history.items()}
        rounds = len(next(iter(self.history.values()), []))
        self.fit_metrics = {
            "dmc_steps": float(rounds * plan.steps_per_epoch),
            "dmc_input_scale": scale or 1.0,
        }
        if best is not None and best.best_epoch is not None:
            self.fit_metrics["dmc_best_step"] = float((best.best_epoch + 1) * plan.steps_per_epoch)
        self._recalibrate_batch_norm(train, batch)

    def _recalibrate_batch_norm(self, train: Samples, batch: int) -> None:
        """Re-estimate the batch-norm statistics with dropout off, as the exact average over
        `RECALIBRATION_BATCHES` training batches (Li et al., "Understanding the disharmony between
        dropout and batch normalization", CVPR 2019).

        Dropout before a batch-norm layer makes the statistics it sees in training differ from
        those at inference, and the head stacks five such layers; without this, a DMC trained
        for few steps predicts well in training mode and poorly in inference mode.
        """
        import keras

        layers = self.model.layers
        dropouts = [layer for layer in layers if isinstance(layer, keras.layers.Dropout)]
        norms = [layer for layer in layers if isinstance(layer, keras.layers.BatchNormalization)]
        rates, momentum = [layer.rate for layer in dropouts], [layer.momentum for layer in norms]
        sums = [np.zeros(2 * layer.moving_mean.shape[0], np.float64) for layer in norms]
        forward = training_forward(self.model)
        for layer in dropouts:
            layer.rate = 0.0
        for layer in norms:
            layer.momentum = 0.0  # the moving statistics become the batch's own
        try:
            for step in range(RECALIBRATION_BATCHES):
                x, _ = train.batch(step, batch, self.settings.seed + 2)
                # Keras' compiled predict (one trace) frees each activation once used, where an
                # eager call holds all of them (at a slice length of 5,000, ~600 MB per batch).
                forward.predict_on_batch(x)
                for total, layer in zip(sums, norms, strict=True):
                    total += np.concatenate([keras.ops.convert_to_numpy(layer.moving_mean),
                                             keras.ops.convert_to_numpy(layer.moving_variance)])  # fmt: skip
        finally:
            for layer, rate in zip(dropouts, rates, strict=True):
                layer.rate = rate
            for layer, value in zip(norms, momentum, strict=True):
                layer.momentum = value
        for total, layer in zip(sums, norms, strict=True):  # the mean over the batches
            mean, variance = np.split(total / RECALIBRATION_BATCHES, 2)
            layer.moving_mean.assign(mean.astype(np.float32))
            layer.moving_variance.assign(variance.astype(np.float32))

    def predict_slices(self, x: np.ndarray) -> np.ndarray:
        import keras

        with interrupts.deferred():  # as in `fit`
            out = self.model.predict(backend.array_batches(np.asarray(x, np.float32), 256), verbose=0,
                                     callbacks=[interrupts.between_steps()])  # fmt: skip
        if self.task.is_regression:
            return self.task.unscale(out[:, 0])
        return keras.ops.convert_to_numpy(keras.ops.softmax(out, axis=-1))

    def _save_model(self, directory: Path) -> None:
        save_keras(self.model, directory / MODEL_FILE, self.settings.save_optimizer)

    def _load_model(self, directory: Path) -> None:
        self.model = load_checked(directory / MODEL_FILE, KERAS_OBJECTS, "a DMC")
