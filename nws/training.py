"""Training one net (reference section 5): Keras `fit` on class-balanced epochs, one clean
evaluation per epoch (plus one before any update), the NWS early-stopping rules.

The training loop knows nothing about snapshots or MLflow: callers pass observers that see the
model and the metrics at every evaluation (epoch 0 is the initialisation).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nws import interrupts
from nws.cnn import IMAGE_SHAPE, build_model
from nws.data.preprocess import BalancedSampler, NetData
from nws.space import NetConfig

MOMENTUM = 0.95
TRAIN_PROBE_IMAGES = 2048
"""Epoch 0 has no training batches to average over: train accuracy is measured on this many
training images instead."""

Observer = Callable[[Any, int, dict[str, float]], None]


@dataclass(frozen=True)
class TrainSettings:
    """Settings that shape a net beyond its 13 properties (all logged as MLflow params)."""

    max_epochs: int = 1000
    min_epochs: int = 20
    lr_decay: float = 1.0  # per-epoch factor; 1.0 = constant rate, as the published nets
    mixed_precision: bool = False
    eval_batch_size: int = 1024
    fall_patience: int = 5
    below_average_limit: int = 30
    stationary_limit: int = 30

    def as_params(self) -> dict[str, Any]:
        return {f"train_{k}": v for k, v in self.__dict__.items()}


class EarlyStopping:
    """The NWS stopping rules, checked once per evaluation, only after `min_epochs` epochs.

    Stop when (a) validation accuracy fell in `fall_patience` consecutive epochs, (b) in
    `below_average_limit` epochs in total it was below its running average (weight 0.5), or
    (c) it stayed unchanged (|change| < 1e-8) for `stationary_limit` consecutive epochs.
    """

    def __init__(self, settings: TrainSettings) -> None:
        self.settings = settings
        self.falls = 0
        self.below_average = 0
        self.stationary = 0
        self.previous: float | None = None
        self.smoothed: float = math.nan
        self.reason: str | None = None

    def update(self, epoch: int, valid_accuracy: float) -> bool:
        """Feed the evaluation after `epoch` epochs (0 = initialisation); True means stop."""
        if self.previous is None:
            self.smoothed = valid_accuracy
        else:
            if valid_accuracy < self.previous:
                self.falls += 1
                self.stationary = 0
            elif abs(valid_accuracy - self.previous) < 1e-8:
                self.stationary += 1
            else:
                self.falls = 0
                self.stationary = 0
            self.smoothed = 0.5 * self.smoothed + 0.5 * valid_accuracy
            if valid_accuracy < self.smoothed:
                self.below_average += 1
        self.previous = valid_accuracy
        if epoch < self.settings.min_epochs:
            return False
        s = self.settings
        for reason, count, limit in (
            ("falling", self.falls, s.fall_patience),
            ("below_average", self.below_average, s.below_average_limit),
            ("stationary", self.stationary, s.stationary_limit),
        ):
            if count >= limit:
                self.reason = reason
                return True
        return False


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""

    def __init__(self, epoch: int) -> None:
        super().__init__(f"loss became NaN in epoch {epoch}")
        self.epoch = epoch


@dataclass
class TrainResult:
    history: list[dict[str, float]] = field(default_factory=list)
    epochs: int = 0
    seconds: float = 0.0
    stop_reason: str = "max_epochs"
    steps_per_epoch: int = 0


_configured = False


def _interop_threads(threads: int) -> int:
    """Inter-op threads to go with `threads` intra-op ones: one or two."""
    return max(1, min(threads, 2))


def tensorflow_environment(threads: int = 0) -> None:
    """What TensorFlow reads from the environment when it starts: GPU memory growth (workers
    share a GPU) and CPU thread pools. Set before anything imports TensorFlow, these hold even
    when loading data starts TensorFlow before `configure_tensorflow` runs."""
    os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")
    if threads:
        os.environ["TF_NUM_INTRAOP_THREADS"] = str(threads)
        os.environ["TF_NUM_INTEROP_THREADS"] = str(_interop_threads(threads))


def configure_tensorflow(deterministic: bool = True, threads: int = 0) -> None:
    """Once per process: GPU memory growth (workers share a GPU), op determinism, CPU threads."""
    global _configured
    if _configured:
        return
    tensorflow_environment(threads)
    import tensorflow as tf

    try:
        for gpu in tf.config.list_physical_devices("GPU"):
            tf.config.experimental.set_memory_growth(gpu, True)
        if threads:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(_interop_threads(threads))
    except RuntimeError:  # TensorFlow already started: the environment above applied instead
        pass
    if deterministic:
        tf.config.experimental.enable_op_determinism()
    _configured = True


def build_augmenter(seed: int) -> Any:
    """The original's augmentation (one switch for geometry and colour) from Keras layers."""
    import keras
    from keras import layers

    side = IMAGE_SHAPE[0]
    shear = math.tan(math.radians(3.0))
    geometry = {"fill_mode": "constant", "fill_value": 0.0}
    return keras.Sequential(
        [
            layers.RandomTranslation(3 / side, 3 / side, seed=seed, **geometry),
            layers.RandomRotation(15 / 360, seed=seed + 1, **geometry),
            layers.RandomZoom((-0.1, 0.1), seed=seed + 2, **geometry),
            layers.RandomShear(x_factor=(0.0, shear), y_factor=(0.0, shear), seed=seed + 3, **geometry),
            layers.RandomBrightness(0.2, value_range=(0.0, 1.0), seed=seed + 4),
            layers.RandomContrast(0.5, value_range=(0.0, 1.0), seed=seed + 5),
            layers.RandomHue((0.0, 0.16), value_range=(0.0, 1.0), seed=seed + 6),
            # Saturation factor f multiplies saturation by f / (1 - f): 0.2308..0.6 -> 0.3..1.5.
            layers.RandomSaturation((0.3 / 1.3, 0.6), value_range=(0.0, 1.0), seed=seed + 7),
            _noise_and_clip_layer()(max_stddev=0.03, seed=seed + 8),
        ],
        name="augmentation",
    )


def _noise_and_clip_layer() -> type:
    import keras

    class NoiseAndClip(keras.layers.Layer):
        """Gaussian noise with a standard deviation drawn per image in [0, max], then clip."""

        def __init__(self, max_stddev: float, seed: int, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.max_stddev = max_stddev
            self.seed_generator = keras.random.SeedGenerator(seed)

        def call(self, images: Any, training: bool = True) -> Any:
            ops = keras.ops
            if training:
                std = keras.random.uniform(
                    (ops.shape(images)[0], 1, 1, 1), 0.0, self.max_stddev, seed=self.seed_generator
                )
                images = images + std * keras.random.normal(ops.shape(images), seed=self.seed_generator)
            return ops.clip(images, 0.0, 1.0)

    return NoiseAndClip


def _index_batches(sampler: BalancedSampler, batch_size: int, steps: int) -> Iterator[np.ndarray]:
    while True:
        order = sampler.epoch()
        for step in range(steps):
            yield order[step * batch_size : (step + 1) * batch_size]


def training_dataset(data: NetData, batch_size: int, seed: int, augment: bool) -> tuple[Any, int]:
    """An endless tf.data stream of class-balanced epochs, and the steps per epoch."""
    import tensorflow as tf

    sampler = BalancedSampler(data.y_train, seed)
    batch_size = min(batch_size, sampler.epoch_size)
    steps = sampler.epoch_size // batch_size
    images = tf.constant(data.x_train)
    labels = tf.constant(data.y_train)
    ds = tf.data.Dataset.from_generator(
        lambda: _index_batches(sampler, batch_size, steps),
        output_signature=tf.TensorSpec([None], tf.int64),
    )
    ds = ds.map(lambda idx: (tf.cast(tf.gather(images, idx), tf.float32) / 255.0, tf.gather(labels, idx)))
    if augment:
        augmenter = build_augmenter(seed)
        ds = ds.map(lambda x, y: (augmenter(x, training=True), y))
    return ds.prefetch(2), steps


def evaluation_dataset(x: np.ndarray, y: np.ndarray, batch_size: int) -> Any:
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)
    return ds.map(lambda a, b: (tf.cast(a, tf.float32) / 255.0, b)).prefetch(2)


def make_optimizer(config: NetConfig, steps_per_epoch: int, settings: TrainSettings) -> Any:
    import keras

    rate: Any = config.lrate
    if settings.lr_decay != 1.0:
        rate = keras.optimizers.schedules.ExponentialDecay(
            config.lrate, decay_steps=steps_per_epoch, decay_rate=settings.lr_decay, staircase=True
        )
    optimizer = {
        "adam": lambda: keras.optimizers.Adam(rate),
        "rmsprop": lambda: keras.optimizers.RMSprop(rate),
        "momentum": lambda: keras.optimizers.SGD(rate, momentum=MOMENTUM),
    }[config.optimizer]()
    if settings.mixed_precision:
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def compile_model(config: NetConfig, steps_per_epoch: int, settings: TrainSettings) -> Any:
    import keras

    model = build_model(config, mixed_precision=settings.mixed_precision)
    model.compile(
        optimizer=make_optimizer(config, steps_per_epoch, settings),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def train_net(
    config: NetConfig,
    data: NetData,
    seed: int,
    settings: TrainSettings = TrainSettings(),
    observers: Sequence[Observer] = (),
) -> TrainResult:
    """Train one net; every evaluation (epoch 0 = initialisation) goes to the observers.

    Raises TrainingDiverged when the loss becomes NaN. A stop signal is held while Keras and
    TensorFlow run, and raised between two steps (`interrupts.between_steps`).
    """
    with interrupts.deferred():
        return _train(config, data, seed, settings, observers)


def _train(
    config: NetConfig, data: NetData, seed: int, settings: TrainSettings, observers: Sequence[Observer]
) -> TrainResult:
    import keras

    keras.utils.set_random_seed(seed)
    started = time.perf_counter()
    if settings.max_epochs > 0:
        train_ds, steps = training_dataset(data, config.batch_size, seed, config.augmentation == "on")
    else:  # only the initialisation is evaluated: no input pipeline to build
        train_ds, steps = None, BalancedSampler(data.y_train, seed).epoch_size // config.batch_size
    model = compile_model(config, max(1, steps), settings)
    valid_ds = evaluation_dataset(data.x_valid, data.y_valid, settings.eval_batch_size)
    test_ds = evaluation_dataset(data.x_test, data.y_test, settings.eval_batch_size)
    result = TrainResult(steps_per_epoch=steps)
    stopping = EarlyStopping(settings)
    stopper = interrupts.between_steps()

    def evaluate(ds: Any) -> dict[str, float]:
        return model.evaluate(ds, verbose=0, return_dict=True, callbacks=[stopper])

    def publish(epoch: int, metrics: dict[str, float]) -> bool:
        stop = stopping.update(epoch, metrics["valid_accuracy"])
        metrics["valid_accuracy_smoothed"] = stopping.smoothed
        metrics["elapsed_seconds"] = time.perf_counter() - started
        result.history.append({"epoch": epoch, **metrics})
        result.epochs = epoch
        for observer in observers:
            observer(model, epoch, metrics)
        return stop

    probe = min(len(data.y_train), TRAIN_PROBE_IMAGES)
    train0 = evaluate(
        evaluation_dataset(data.x_train[:probe], data.y_train[:probe], settings.eval_batch_size)
    )
    valid0, test0 = evaluate(valid_ds), evaluate(test_ds)
    publish(0, _metrics(train0["accuracy"], train0["loss"], valid0, test0))

    class EpochEnd(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
            logs = logs or {}
            done = epoch + 1
            if not math.isfinite(float(logs.get("loss", math.nan))):
                raise TrainingDiverged(done)
            valid = {"accuracy": logs["val_accuracy"], "loss": logs["val_loss"]}
            test = evaluate(test_ds)
            if publish(done, _metrics(logs["accuracy"], logs["loss"], valid, test)):
                result.stop_reason = stopping.reason or "early_stopping"
                self.model.stop_training = True

    if settings.max_epochs > 0:
        model.fit(
            train_ds,
            epochs=settings.max_epochs,
            steps_per_epoch=steps,
            validation_data=valid_ds,
            callbacks=[stopper, EpochEnd()],
            shuffle=False,  # the stream is already shuffled and balanced per epoch
            verbose=0,
        )
    result.seconds = time.perf_counter() - started
    return result


def _metrics(
    train_accuracy: float, loss: float, valid: dict[str, float], test: dict[str, float]
) -> dict[str, float]:
    return {
        "train_accuracy": float(train_accuracy),
        "loss": float(loss),
        "valid_accuracy": float(valid["accuracy"]),
        "valid_loss": float(valid["loss"]),
        "test_accuracy": float(test["accuracy"]),
        "test_loss": float(test["loss"]),
    }
