"""Packed training (JAX backend): nets of one compiled graph stepped together by `jax.vmap`
over their stacked variables, each otherwise trained as it would be alone.

Every net is built by `nws.net.training.build_net` after its own seeding, so its initial weights are
bit-identical to the lone net's. Its variables, batch-norm statistics, dropout and augmentation
RNG states (non-trainable variables) and optimizer state (its learning rate and step count
included) are stacked along a leading net axis; one jitted step runs `stateless_call` and
`stateless_apply` on every net's slice with that net's own batch (its own class-balanced
sampler). A net keeps its own steps per epoch; when its epoch ends it is evaluated alone through
the same Keras evaluation as a lone net (its values loaded into one template, so one compile),
then its own early stopping decides; a stopped or diverged net is masked and stops changing.
vmap changes the compiled program (grouped convolutions), so packed and lone nets agree to
rounding (about 1e-6 after one step), not bit for bit.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nws import interrupts
from nws.data.preprocess import BalancedSampler, NetData
from nws.net.training import (
    BuiltNet,
    EarlyStopping,
    Observer,
    TrainingDiverged,
    TrainResult,
    TrainSettings,
    _metrics,
    build_net,
    seed_backend,
)
from nws.space import ARCHITECTURE, NetConfig

GRAPH_PROPERTIES = (*ARCHITECTURE, "batch_norm", "batch_size", "optimizer", "activation", "augmentation")
"""What nets must share to share a compiled step: the graph (architecture, activation, the
augmenter), the batch shape and the optimizer's kind (its state's shapes). Dataset, learning
rate, initialisation and seed may differ."""


def pack_key(config: NetConfig, data: NetData) -> tuple[Any, ...]:
    """Nets with equal keys can be packed. The batch is the one the net trains with: a training
    set smaller than one batch trains in batches of its (balanced) epoch."""
    epoch_size = BalancedSampler(data.y_train, 0).epoch_size
    return (*(getattr(config, name) for name in GRAPH_PROPERTIES), min(config.batch_size, epoch_size))


@dataclass
class _Net:
    built: BuiltNet
    data: NetData
    sampler: BalancedSampler
    stopping: EarlyStopping
    eval_state: list[Any]
    result: TrainResult = field(default_factory=TrainResult)
    order: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    step: int = 0
    done: bool = False
    diverged: TrainingDiverged | None = None


def _device_images(data: Sequence[NetData]) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """The training images of a pack, each source once (nets of one dataset share its images),
    their labels, and per net the row of each of its training images."""
    offsets: dict[int, int] = {}
    images, labels, rows = [], [], []
    size = 0
    for d in data:
        if d.pool is not None and d.train_rows is not None:
            x, y, own = d.pool.x_train, d.pool.y_train, d.train_rows
        else:
            x, y, own = d.x_train, d.y_train, np.arange(len(d.y_train))
        if id(x) not in offsets:
            offsets[id(x)] = size
            images.append(x)
            labels.append(y)
            size += len(y)
        rows.append((offsets[id(x)] + own).astype(np.int32))
    return np.concatenate(images), np.concatenate(labels).astype(np.int32), rows


class PackTrainer:
    """P nets of one `pack_key`, trained together; `train` gives each its own outcome."""

    def __init__(
        self,
        configs: Sequence[NetConfig],
        data: Sequence[NetData],
        seeds: Sequence[int],
        settings: TrainSettings,
    ) -> None:
        import jax
        import jax.numpy as jnp

        if len({pack_key(c, d) for c, d in zip(configs, data, strict=True)}) != 1:
            raise ValueError("a pack holds nets of one pack_key")
        self.settings, self.started = settings, time.perf_counter()
        self.nets: list[_Net] = []
        states = []
        for config, net_data, seed in zip(configs, data, seeds, strict=True):
            seed_backend(seed)
            built = build_net(config, net_data, seed, settings)
            fitted = built.fitted
            fitted.optimizer.build(fitted.trainable_variables)
            own = {id(v) for v in fitted.variables}
            extra = [v for v in built.evaluated.non_trainable_variables if id(v) not in own]
            states.append(
                [
                    [np.asarray(v.value) for v in group]
                    for group in (fitted.trainable_variables, fitted.non_trainable_variables)
                ]
                + [[np.asarray(v.value) for v in fitted.optimizer.variables]]
            )
            sampler = BalancedSampler(net_data.y_train, seed)
            net = _Net(
                built, net_data, sampler, EarlyStopping(settings), [np.asarray(v.value) for v in extra]
            )
            net.result.steps_per_epoch = built.steps
            self.nets.append(net)
        self.template = self.nets[0].built
        self.batch = pack_key(configs[0], data[0])[-1]
        fitted = self.template.fitted
        self._fitted_vars = (fitted.trainable_variables, fitted.non_trainable_variables)
        own = {id(v) for v in fitted.variables}
        self._extra_vars = [v for v in self.template.evaluated.non_trainable_variables if id(v) not in own]
        self.state = [
            [jnp.stack([s[g][k] for s in states]) for k in range(len(states[0][g]))] for g in range(3)
        ]
        images, labels, self.rows = _device_images(data)
        self.images, self.labels = jnp.asarray(images), jnp.asarray(labels)
        self.active = jnp.ones(len(self.nets), bool)
        self._step = jax.jit(self._packed_step, donate_argnums=(0, 1, 2))

    def _packed_step(self, tv: Any, ntv: Any, ov: Any, index: Any, active: Any) -> Any:
        import jax

        x = self.images[index].astype("float32") * (1 / 255)
        return jax.vmap(self._one_step)(tv, ntv, ov, x, self.labels[index], active)

    def _one_step(self, tv: Any, ntv: Any, ov: Any, x: Any, y: Any, active: Any) -> Any:
        """One net's optimizer step, as Keras' JAX `train_step` does it; a masked net keeps its state."""
        import jax
        import jax.numpy as jnp
        import keras

        model, optimizer = self.template.fitted, self.template.fitted.optimizer

        def loss_of(trainable: Any) -> Any:
            logits, new_ntv = model.stateless_call(trainable, ntv, x, training=True)
            loss = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
            return jnp.mean(loss), (new_ntv, logits)

        (loss, (new_ntv, logits)), grads = jax.value_and_grad(loss_of, has_aux=True)(tv)
        new_tv, new_ov = optimizer.stateless_apply(ov, grads, tv)

        def keep(new: Any, old: Any) -> list[Any]:
            return [jnp.where(active, a, b) for a, b in zip(new, old, strict=True)]

        correct = jnp.sum(jnp.argmax(logits, -1) == y)
        return keep(new_tv, tv), keep(new_ntv, ntv), keep(new_ov, ov), loss, correct

    def step(self, index: np.ndarray) -> tuple[Any, Any]:
        """One optimizer step of every active net on its images `index[i]` (rows of the pack's
        images: `self.rows[i]` are net i's); per net the batch's loss and correct predictions."""
        tv, ntv, ov, loss, correct = self._step(*self.state, index, self.active)
        self.state = [tv, ntv, ov]
        return loss, correct

    def train(self, observers: Sequence[Sequence[Observer]]) -> list[TrainResult | TrainingDiverged]:
        """Train every net to its own end; per net its TrainResult, or TrainingDiverged when its
        loss became NaN. `observers[i]` see net i at each of its evaluations, as with `train_net`.
        A stop signal is held while JAX runs and raised between two steps."""
        with interrupts.deferred():
            self._train(observers)
        return [net.diverged or net.result for net in self.nets]

    def _train(self, observers: Sequence[Sequence[Observer]]) -> None:
        import jax.numpy as jnp

        for i, net in enumerate(self.nets):  # epoch 0: the initialisation
            probe = self._evaluate(i, net.built.evaluation.train_probe())
            self._publish(i, 0, probe["accuracy"], probe["loss"], observers[i])
        batch, size = self.batch, len(self.nets)
        loss_sum, correct_sum = jnp.zeros(size), jnp.zeros(size)
        while not all(net.done for net in self.nets):
            interrupts.check()
            index = np.zeros((size, batch), np.int32)
            for i, net in enumerate(self.nets):
                if not net.done:
                    if net.step == 0:
                        net.order = net.sampler.epoch()
                    index[i] = self.rows[i][net.order[net.step * batch : (net.step + 1) * batch]]
            loss, correct = self.step(index)
            loss_sum, correct_sum = loss_sum + loss, correct_sum + correct
            ending = []
            for i, net in enumerate(self.nets):
                if not net.done:
                    net.step += 1
                    if net.step == net.built.steps:
                        ending.append(i)
            if not ending:
                continue
            losses, corrects = np.asarray(loss_sum), np.asarray(correct_sum)
            for i in ending:
                net, epoch = self.nets[i], self.nets[i].result.epochs + 1
                net.step, mean_loss = 0, float(losses[i]) / net.built.steps
                if not math.isfinite(mean_loss):  # this net fails; the others go on
                    net.diverged, net.done = TrainingDiverged(epoch), True
                    self.active = self.active.at[i].set(False)
                    continue
                accuracy = float(corrects[i]) / (net.built.steps * batch)
                self._publish(i, epoch, accuracy, mean_loss, observers[i])
            keep = np.ones(size, np.float32)
            keep[ending] = 0
            loss_sum, correct_sum = loss_sum * keep, correct_sum * keep

    def _load(self, i: int) -> None:
        """Net i's values into the template, for a Keras evaluation and for observers."""
        tv, ntv, _ = self.state
        for variables, stacked in zip(self._fitted_vars, (tv, ntv), strict=True):
            for variable, values in zip(variables, stacked, strict=True):
                variable.assign(values[i])
        for variable, value in zip(self._extra_vars, self.nets[i].eval_state, strict=True):
            variable.assign(value)

    def _store(self, i: int) -> None:
        """What evaluation changed (fidelity paper: batch-norm statistics, the evaluation
        augmenter's RNG) back into net i's state."""
        ntv = self.state[1]
        self.state[1] = [a.at[i].set(v.value) for a, v in zip(ntv, self._fitted_vars[1], strict=True)]
        self.nets[i].eval_state = [np.asarray(v.value) for v in self._extra_vars]

    def _evaluate(self, i: int, dataset: Any) -> dict[str, float]:
        self._load(i)
        stopper = interrupts.between_steps()
        metrics = self.template.evaluated.evaluate(dataset, verbose=0, return_dict=True, callbacks=[stopper])
        self._store(i)
        return metrics

    def _publish(
        self, i: int, epoch: int, accuracy: float, loss: float, observers: Sequence[Observer]
    ) -> None:
        net = self.nets[i]
        evaluation = net.built.evaluation
        valid = self._evaluate(i, evaluation.of(net.data.x_valid, net.data.y_valid))
        test = self._evaluate(i, evaluation.of(net.data.x_test, net.data.y_test))
        metrics = _metrics(accuracy, loss, valid, test)
        stop = net.stopping.update(epoch, metrics["valid_accuracy"])
        metrics["valid_accuracy_smoothed"] = net.stopping.smoothed
        metrics["elapsed_seconds"] = time.perf_counter() - self.started
        net.result.history.append({"epoch": epoch, **metrics})
        net.result.epochs = epoch
        self._load(i)
        for observer in observers:
            observer(self.template.net, epoch, metrics)
        if stop:
            net.result.stop_reason = net.stopping.reason or "early_stopping"
        if stop or epoch >= self.settings.max_epochs:
            net.done = True
            net.result.seconds = time.perf_counter() - self.started
            self.active = self.active.at[i].set(False)
