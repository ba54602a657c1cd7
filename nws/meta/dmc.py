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

from pathlib import Path
from typing import Any

import numpy as np

from nws import interrupts
from nws.meta.base import MetaClassifier
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
MIN_EXTRA_LAYERS = 6
POOL_WHILE_ABOVE = 50
MODEL_FILE = "dmc.keras"
KERAS_OBJECTS = frozenset({
    "keras.src.models.functional.Functional", "keras.layers.InputLayer", "keras.layers.Reshape",
    "keras.layers.Conv1D", "keras.layers.Activation", "keras.layers.BatchNormalization",
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


def build_dmc(length: int, n_outputs: int) -> Any:
    import keras
    from keras import layers

    inputs = keras.Input(shape=(length,), name="weights")
    x = layers.Reshape((length, 1), name="as_sequence")(inputs)
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


def array_batches(arrays: Any, batch_size: int) -> Any:
    """Arrays as a tf.data stream of batches, for Keras' `predict` and validation.

    Given arrays, Keras builds its own stream with a parallel map, which tf.data turns into a
    sequential one under op determinism, logging an error-level "NodeDef mentions attribute
    use_unbounded_threadpool" line per call; this stream has no map."""
    import tensorflow as tf

    return tf.data.Dataset.from_tensor_slices(arrays).batch(batch_size)


def slice_dataset(samples: Samples, batch_size: int, seed: int) -> Any:
    """An endless tf.data stream of (slices, targets), a new random slice for every sample of
    every batch, produced in a background thread ahead of the training step."""
    import tensorflow as tf

    length = samples.length
    return tf.data.Dataset.from_generator(
        lambda: samples.batches(batch_size, seed),
        output_signature=(
            tf.TensorSpec([batch_size, length], tf.float32),
            tf.TensorSpec([batch_size], tf.float64 if samples.label.dtype.kind == "f" else tf.int64),
        ),
    ).prefetch(4)


class DMC(MetaClassifier):
    name = "dmc"

    model: Any = None

    def _compile(self) -> None:
        import keras

        n_outputs = 1 if self.task.is_regression else len(self.task.classes)
        self.model = build_dmc(self.settings.slice_length, n_outputs)
        if self.task.is_regression:
            loss, metrics = keras.losses.MeanAbsoluteError(), []
        else:
            loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
            metrics = ["accuracy"]
        self.model.compile(
            optimizer=keras.optimizers.Adam(self.settings.learning_rate), loss=loss, metrics=metrics
        )

    def _targets(self, samples: Samples) -> Samples:
        if not self.task.is_regression:
            return samples
        return Samples(
            samples.zoo, samples.net, samples.k, self.task.scale(samples.label), samples.length,
            samples.low, samples.high,
        )  # fmt: skip

    def fit(self, train: Samples, valid: Samples) -> None:
        with interrupts.deferred():  # a stop is raised between two steps (interrupts.between_steps)
            self._fit(train, valid)

    def _fit(self, train: Samples, valid: Samples) -> None:
        import keras
        import tensorflow as tf

        keras.utils.set_random_seed(self.settings.seed)
        self._compile()
        train = self._targets(train)
        batch = min(self.settings.batch_size, len(train))
        steps = max(1, len(train) // batch)
        validation = None
        if len(valid):
            rng = np.random.default_rng(self.settings.seed + 1)
            valid = self._targets(valid)
            everything = np.arange(len(valid))
            label = valid.label.astype(np.float32) if self.task.is_regression else valid.label
            validation = array_batches((valid.random_slices(everything, rng), label), 256)
        epochs = Steps(f"{self.task.prop} / dmc training", self.settings.epochs, "epochs")
        with epochs:
            history = self.model.fit(
                slice_dataset(train, batch, self.settings.seed).map(
                    lambda x, y: (x, tf.cast(y, tf.float32) if self.task.is_regression else y)
                ),
                epochs=self.settings.epochs,
                steps_per_epoch=steps,
                validation_data=validation,
                callbacks=[interrupts.between_steps(), epochs.keras_callback()],
                shuffle=False,
                verbose=0,
            )
        self.history = {k: [float(v) for v in vs] for k, vs in history.history.items()}
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
        import tensorflow as tf

        layers = self.model.layers
        dropouts = [layer for layer in layers if isinstance(layer, keras.layers.Dropout)]
        norms = [layer for layer in layers if isinstance(layer, keras.layers.BatchNormalization)]
        rates, momentum = [layer.rate for layer in dropouts], [layer.momentum for layer in norms]
        # A compiled forward pass: the graph frees each activation once used, where an eager
        # call holds all of them (at a slice length of 5,000, some 600 MB per batch of 64). The
        # momentum is a variable, so one trace serves every step.
        cumulative = tf.Variable(0.0, trainable=False, name="recalibration_momentum")
        forward = tf.function(lambda x: self.model(x, training=True))
        for layer in dropouts:
            layer.rate = 0.0
        for layer in norms:
            layer.momentum = cumulative
        try:
            batches = train.batches(batch, self.settings.seed + 2)
            for step in range(RECALIBRATION_BATCHES):
                cumulative.assign(step / (step + 1))  # moving = mean of the batches seen so far
                forward(tf.constant(next(batches)[0]))
        finally:
            for layer, rate in zip(dropouts, rates, strict=True):
                layer.rate = rate
            for layer, value in zip(norms, momentum, strict=True):
                layer.momentum = value

    def predict_slices(self, x: np.ndarray) -> np.ndarray:
        import keras

        with interrupts.deferred():  # as in `fit`
            out = self.model.predict(array_batches(np.asarray(x, np.float32), 256), verbose=0,
                                     callbacks=[interrupts.between_steps()])  # fmt: skip
        if self.task.is_regression:
            return self.task.unscale(out[:, 0])
        return keras.ops.convert_to_numpy(keras.ops.softmax(out, axis=-1))

    def _save_model(self, directory: Path) -> None:
        save_keras(self.model, directory / MODEL_FILE, self.settings.save_optimizer)

    def _load_model(self, directory: Path) -> None:
        self.model = load_checked(directory / MODEL_FILE, KERAS_OBJECTS, "a DMC")
