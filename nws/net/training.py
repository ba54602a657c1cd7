"""Training one net (reference section 5): Keras `fit` on class-balanced epochs, one evaluation
per epoch (plus one before any update), the NWS early-stopping rules.

How evaluation works depends on the fidelity (`nws.net.fidelity`). Under `paper`, as in the released
code: batch norm uses batch statistics and updates its moving statistics in every forward pass,
evaluation runs in batches of the net's batch size (remainder dropped) on augmented images when
augmentation is on, and the epoch-0 train accuracy is measured on the first training batch.
Under `clean`: batch norm uses its moving statistics, evaluation is on clean images in large
batches, and snapshot 1 is the pure initialisation.

The training loop knows nothing about snapshots or MLflow: callers pass observers that see the
model and the metrics at every evaluation (epoch 0 is the initialisation). The images reach it
through the input pipelines of `nws.net.pipeline`: tf.data on TensorFlow, numpy batches and the
augmentation inside the model elsewhere (JAX), where no TensorFlow is imported.

Why one module: a net's build order (seed, models, optimizer, input pipelines: `build_net`) and
the loop that trains it must stay in step; `nws.net.pack` builds every packed net through `build_net`
so that it starts bit-identical to the same net trained alone.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nws import interrupts
from nws.backend import current as current_backend
from nws.backend import seed as seed_backend
from nws.data.preprocess import BalancedSampler, NetData
from nws.net.cnn import build_model
from nws.net.compiled import MODELS, CompiledModels
from nws.net.fidelity import DEFAULT_FIDELITY, PAPER, check_fidelity
from nws.net.pipeline import (
    TensorFlowStreams,
    balanced_batches,
    build_augmenter,
    evaluation_augmenter_seed,
    evaluation_batches,
    evaluation_dataset,
    evaluation_model,
    paper_evaluation_batch,
    training_model,
)
from nws.space import NetConfig

MOMENTUM = 0.95
TRAIN_PROBE_IMAGES = 2048
"""Epoch 0 has no training batches to average over: under fidelity `clean`, train accuracy is
measured on this many training images instead (under `paper`: on the first training batch, as
the released code)."""

Observer = Callable[[Any, int, dict[str, float]], None]


@dataclass(frozen=True)
class TrainSettings:
    """Settings that shape a net beyond its 13 properties (all logged as MLflow params)."""

    max_epochs: int = 1000
    min_epochs: int = 20
    lr_decay: float = 1.0  # per-epoch factor; 1.0 = constant rate, as the published nets
    mixed_precision: bool = False
    eval_batch_size: int = 1024  # fidelity clean only: paper evaluates in batches of the net's size
    fall_patience: int = 5
    below_average_limit: int = 30
    stationary_limit: int = 30
    fidelity: str = DEFAULT_FIDELITY  # paper or clean: see nws.net.fidelity

    def __post_init__(self) -> None:
        check_fidelity(self.fidelity)

    @property
    def paper(self) -> bool:
        return self.fidelity == PAPER

    @property
    def first_stop_epoch(self) -> int:
        """The first epoch after which early stopping may stop a net. The released code counts
        evaluations from 1, the initialisation included, and allows a stop once 20 exist
        (`ii >= 20`), i.e. after 19 epochs: under `paper` that is `min_epochs - 1`."""
        return max(0, self.min_epochs - 1) if self.paper else self.min_epochs

    def as_params(self) -> dict[str, Any]:
        return {f"train_{k}": v for k, v in self.__dict__.items()}


class EarlyStopping:
    """The NWS stopping rules, checked once per evaluation, only after `min_epochs` epochs
    (`min_epochs - 1` under fidelity `paper`: `TrainSettings.first_stop_epoch`).

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
        if epoch < self.settings.first_stop_epoch:
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


def make_optimizer(config: NetConfig, steps_per_epoch: int, settings: TrainSettings) -> Any:
    """The net's optimizer at its framework defaults: TF1's under fidelity `paper` (RMSProp with
    the accumulator at one and epsilon 1e-10, Adam with epsilon 1e-8), Keras' under `clean`."""
    import keras

    rate: Any = config.lrate
    if settings.lr_decay != 1.0:
        rate = keras.optimizers.schedules.ExponentialDecay(
            config.lrate, decay_steps=steps_per_epoch, decay_rate=settings.lr_decay, staircase=True
        )
    if settings.paper and config.optimizer != "momentum":
        from nws.net.optimizers import TF1_ADAM_EPSILON, TF1RMSprop

        optimizer = {
            "adam": lambda: keras.optimizers.Adam(rate, epsilon=TF1_ADAM_EPSILON),
            "rmsprop": lambda: TF1RMSprop(rate),
        }[config.optimizer]()
    else:
        optimizer = {
            "adam": lambda: keras.optimizers.Adam(rate),
            "rmsprop": lambda: keras.optimizers.RMSprop(rate),
            "momentum": lambda: keras.optimizers.SGD(rate, momentum=MOMENTUM),
        }[config.optimizer]()
    if settings.mixed_precision:
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def compile_model(config: NetConfig, steps_per_epoch: int, settings: TrainSettings) -> Any:
    """One net's model, built and compiled as `build_net` does when augmentation is outside it."""
    model = build_model(config, mixed_precision=settings.mixed_precision, fidelity=settings.fidelity)
    _compile(model, model, config, steps_per_epoch, settings)
    return model


def _compile(
    fitted: Any, evaluated: Any, config: NetConfig, steps_per_epoch: int, settings: TrainSettings
) -> None:
    """Compile what `fit` trains with the net's optimizer, and the evaluated model when it is
    another one (`BuiltNet`)."""
    import keras

    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    fitted.compile(
        optimizer=make_optimizer(config, steps_per_epoch, settings), loss=loss, metrics=["accuracy"]
    )
    if evaluated is not fitted:
        evaluated.compile(optimizer=None, loss=loss, metrics=["accuracy"])


def train_net(
    config: NetConfig,
    data: NetData,
    seed: int,
    settings: TrainSettings = TrainSettings(),
    observers: Sequence[Observer] = (),
    kept: CompiledModels | None = MODELS,
) -> TrainResult:
    """Train one net; every evaluation (epoch 0 = initialisation) goes to the observers. The
    net trains on `kept` models of its graph when there are such (None: models of its own).

    Raises TrainingDiverged when the loss becomes NaN. A stop signal is held while Keras and
    its backend run, and raised between two steps (`interrupts.between_steps`).
    """
    with interrupts.deferred():
        try:
            return _train(config, data, seed, settings, observers, kept)
        except TrainingDiverged:
            raise  # ended by its own callback between two epochs: the models stay usable
        except BaseException:
            # A fit cut short at any other point (a stop, an error) may leave Keras state of its
            # own in the model: the next net of this graph builds its own.
            if kept is not None:
                kept.forget(graph_key(config, settings, current_backend().tensorflow))
            raise


def _train(
    config: NetConfig,
    data: NetData,
    seed: int,
    settings: TrainSettings,
    observers: Sequence[Observer],
    kept: CompiledModels | None,
) -> TrainResult:
    import keras

    seed_backend(seed)
    started = time.perf_counter()
    built = build_net(config, data, seed, settings, kept)
    model, evaluation_sets = built.net, built.evaluation
    valid_ds = evaluation_sets.of(data.x_valid, data.y_valid)
    test_ds = evaluation_sets.of(data.x_test, data.y_test)
    result = TrainResult(steps_per_epoch=built.steps)
    stopping = EarlyStopping(settings)
    stopper = interrupts.between_steps()

    def evaluate(ds: Any) -> dict[str, float]:
        return built.evaluated.evaluate(ds, verbose=0, return_dict=True, callbacks=[stopper])

    def publish(epoch: int, metrics: dict[str, float]) -> bool:
        stop = stopping.update(epoch, metrics["valid_accuracy"])
        metrics["valid_accuracy_smoothed"] = stopping.smoothed
        metrics["elapsed_seconds"] = time.perf_counter() - started
        result.history.append({"epoch": epoch, **metrics})
        result.epochs = epoch
        for observer in observers:
            observer(model, epoch, metrics)
        return stop

    train0 = evaluate(evaluation_sets.train_probe())
    valid0, test0 = evaluate(valid_ds), evaluate(test_ds)
    publish(0, _metrics(train0["accuracy"], train0["loss"], valid0, test0))

    class EpochEnd(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
            logs = logs or {}
            done = epoch + 1
            if not math.isfinite(float(logs.get("loss", math.nan))):
                raise TrainingDiverged(done)
            if built.tf_data:  # validated by `fit` itself
                valid = {"accuracy": logs["val_accuracy"], "loss": logs["val_loss"]}
            else:  # through the evaluated model: `fit` would validate the augmenting one
                valid = evaluate(valid_ds)
            test = evaluate(test_ds)
            if publish(done, _metrics(logs["accuracy"], logs["loss"], valid, test)):
                result.stop_reason = stopping.reason or "early_stopping"
                self.model.stop_training = True

    if settings.max_epochs > 0:
        built.fitted.fit(
            built.train_source,
            epochs=settings.max_epochs,
            steps_per_epoch=built.steps,
            validation_data=valid_ds if built.tf_data else None,
            callbacks=[stopper, EpochEnd()],
            shuffle=False,  # the stream is already shuffled and balanced per epoch
            verbose=0,
        )
    result.seconds = time.perf_counter() - started
    return result


@dataclass
class BuiltNet:
    """One net as its training needs it. `net` is the model snapshots read; `fitted` is what
    `fit` trains (the net, or on JAX with augmentation on, the augmenter then the net);
    `evaluated` is what evaluation runs (on JAX under `paper` with augmentation on: the net on
    images of its evaluation augmenter). On TensorFlow the tf.data pipelines augment instead."""

    net: Any
    fitted: Any
    evaluated: Any
    evaluation: EvaluationSets
    steps: int
    train_source: Any
    tf_data: bool


def build_net(
    config: NetConfig, data: NetData, seed: int, settings: TrainSettings, kept: CompiledModels | None = None
) -> BuiltNet:
    """The net's models, compiled, and its input pipelines: right after seeding (`seed_backend`),
    in this order, so that a net built here is the same wherever it trains (alone or packed).
    With `kept`, the models are the compiled ones of an earlier net of the same graph
    (`graph_key`) holding this net's starting values, when there are such (`nws.net.compiled`)."""
    augment = config.augmentation == "on"
    tf_data = current_backend().tensorflow
    streams = _streams(kept) if tf_data else None
    if streams is not None and settings.max_epochs > 0:
        source, steps = streams.training(data, config.batch_size, seed, augment)
    elif tf_data:  # only the initialisation is evaluated: no input pipeline to build
        source, steps = None, BalancedSampler(data.y_train, seed).epoch_size // config.batch_size
    else:
        source, steps = balanced_batches(data, config.batch_size, seed)
    if kept is not None and kept.capacity == 0:
        kept = None
    fresh = _models(config, seed, settings, augment_in_model=augment and not tf_data)
    key = graph_key(config, settings, tf_data) if kept is not None else None
    models = kept.take(key, fresh, config.lrate) if kept is not None and key is not None else None
    if models is None:
        models = fresh
        _compile(fresh[0], fresh[2], config, max(1, steps), settings)
        if kept is not None and key is not None:
            kept.keep(key, fresh)
    fitted, net, evaluated = models
    evaluation = EvaluationSets(config, data, seed, settings, streams)
    return BuiltNet(net, fitted, evaluated, evaluation, steps, source, tf_data)


def _models(config: NetConfig, seed: int, settings: TrainSettings, augment_in_model: bool) -> tuple[Any, ...]:
    """The model `fit` trains, the net and the model evaluated, uncompiled (see `BuiltNet`)."""
    net = build_model(config, mixed_precision=settings.mixed_precision, fidelity=settings.fidelity)
    if not augment_in_model:
        return net, net, net
    from nws.net.augmentation import build_affine_augmenter

    fitted = training_model(net, build_affine_augmenter(seed))
    evaluated = net
    if settings.paper:
        evaluated = evaluation_model(net, build_affine_augmenter(evaluation_augmenter_seed(seed)))
    return fitted, net, evaluated


def graph_key(config: NetConfig, settings: TrainSettings, tf_data: bool) -> tuple[Any, ...] | None:
    """What nets must share to train on the same compiled models (`nws.net.compiled`): the graph
    (architecture, activation, batch norm, fidelity; on JAX the augmenter inside the model) and
    the optimizer's kind. Data, batch size, learning rate, initialisation and seed may differ.
    None for nets that keep no models: a decaying learning rate (its schedule is part of the
    compiled step) or mixed precision (a loss-scaling optimizer)."""
    if settings.lr_decay != 1.0 or settings.mixed_precision:
        return None
    augmenter = () if tf_data else (config.augmentation,)
    return (*config.architecture().values(), config.batch_norm, config.activation, config.optimizer,
            settings.fidelity, *augmenter)  # fmt: skip


STREAMS = TensorFlowStreams()
"""This process's tf.data pipelines, kept with its compiled models (`nws.net.compiled`)."""


def _streams(kept: CompiledModels | None) -> TensorFlowStreams:
    """The kept pipelines when models are kept, else a net's own."""
    return STREAMS if kept is not None and kept.capacity > 0 else TensorFlowStreams()


class EvaluationSets:
    """The evaluation pipelines of one net, as its fidelity wants them: tf.data `streams` on
    TensorFlow (augmented there under `paper` with augmentation on), numpy batches otherwise
    (the augmentation, where wanted, is in the evaluated model)."""

    def __init__(
        self,
        config: NetConfig,
        data: NetData,
        seed: int,
        settings: TrainSettings,
        streams: TensorFlowStreams | None = None,
    ) -> None:
        self.config, self.data, self.seed, self.settings = config, data, seed, settings
        self.streams = streams
        self.augmenter = None
        if streams is not None and settings.paper and config.augmentation == "on":
            self.augmenter = build_augmenter(evaluation_augmenter_seed(seed))

    def of(self, x: np.ndarray, y: np.ndarray) -> Any:
        """The batches of an evaluation of `x`."""
        if not self.settings.paper:
            batch, drop = self.settings.eval_batch_size, False
        else:
            batch, drop = paper_evaluation_batch(len(y), self.config.batch_size), True
        if self.streams is None:
            return evaluation_batches(x, y, batch, drop_remainder=drop)
        return evaluation_dataset(x, y, batch, drop_remainder=drop, augmenter=self.augmenter)

    def train_probe(self) -> Any:
        """Epoch 0's train accuracy. Under `paper`: the first batch of the training stream (the
        same images the first step trains on, with a fresh augmentation), as the released code;
        under `clean`: the first TRAIN_PROBE_IMAGES training images."""
        data = self.data
        if not self.settings.paper:
            probe = min(len(data.y_train), TRAIN_PROBE_IMAGES)
            return self.of(data.x_train[:probe], data.y_train[:probe])
        sampler = BalancedSampler(data.y_train, self.seed)  # the stream's sampler, same seed
        first = sampler.epoch()[: min(self.config.batch_size, sampler.epoch_size)]
        return self.of(data.x_train[first], data.y_train[first])


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
