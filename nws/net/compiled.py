"""Compiled models kept per graph signature, so that the nets of a worker do not each pay for
Keras' tracing (TensorFlow) or compiling (JAX) of `fit`'s and `evaluate`'s steps.

On two CPU cores a new Keras model costs ~4-5 s of tracing before its first step, about as much
as 20 epochs of a small net. Nets that differ only in data, learning rate, initialisation and
seed run the same graph, so a worker keeps the compiled models of the nets it trained and gives
the next such net those models with its own starting values loaded: every variable (weights,
batch-norm statistics, the RNG states of dropout and augmentation) copied from the same models
built fresh after the net's own seeding, and the optimizer's state (step count, slots) reset to
its state before any step, with the net's learning rate. A net trained on a kept model is
bit-identical to the same net built fresh (tested for every property value).

Knows nothing of configurations: `nws.net.training` says which nets share a graph (its key).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from nws.errors import ParameterError

CAPACITY = 24
"""Kept graphs per process, least recently used dropped first: the fixed subset has 12 per
fidelity (4 activations x 3 optimizers); a main-subset campaign rarely repeats one.
`NWS_KEPT_GRAPHS` sets another number; 0 keeps none (every net builds and traces its own)."""


@dataclass
class _Kept:
    models: tuple[Any, ...]  # compiled models; the first is trained
    optimizer_start: list[np.ndarray]


class CompiledModels:
    """The compiled models of one process, by graph key (see the module's docstring)."""

    def __init__(self, capacity: int | None = None) -> None:
        self._capacity = capacity
        self._kept: OrderedDict[Hashable, _Kept] = OrderedDict()
        self.hits = 0
        self.misses = 0

    @property
    def capacity(self) -> int:
        return kept_graphs() if self._capacity is None else self._capacity

    def __len__(self) -> int:
        return len(self._kept)

    def forget(self, key: Hashable | None) -> None:
        """Drop the models of `key` (their last fit was cut short)."""
        self._kept.pop(key, None)

    def take(self, key: Hashable, fresh: Sequence[Any], learning_rate: float) -> tuple[Any, ...] | None:
        """The kept models of `key`, in the order of `fresh` (the same models, built uncompiled
        after the net's seeding; the first is the one trained), holding the starting values of
        `fresh` and an optimizer reset to before its first step with `learning_rate`; None when
        none are kept (then compile `fresh` and `keep` it)."""
        kept = self._kept.get(key)
        if kept is None:
            self.misses += 1
            return None
        self._kept.move_to_end(key)
        if len(fresh) != len(kept.models):
            raise ValueError(f"{len(fresh)} models given, {len(kept.models)} kept")
        copied: list[Any] = []
        for target, source in zip(kept.models, fresh, strict=True):
            if all(target is not done for done in copied):
                copy_values(source.variables, target.variables)
                copied.append(target)
        optimizer = kept.models[0].optimizer
        for variable, value in zip(optimizer.variables, kept.optimizer_start, strict=True):
            variable.assign(value)
        optimizer.learning_rate = float(learning_rate)
        self.hits += 1
        return kept.models

    def keep(self, key: Hashable, models: Sequence[Any]) -> None:
        """Keep compiled `models` (the first one is trained: its optimizer is built here, before
        any step, and its state kept as every later net's start)."""
        models = tuple(models)
        trained = models[0]
        trained.optimizer.build(trained.trainable_variables)
        start = [np.array(v.value) for v in trained.optimizer.variables]
        self._kept[key] = _Kept(models, start)
        self._kept.move_to_end(key)
        while len(self._kept) > self.capacity:
            self._kept.popitem(last=False)


def kept_graphs() -> int:
    """How many graphs a process keeps: `NWS_KEPT_GRAPHS`, else CAPACITY."""
    raw = os.environ.get("NWS_KEPT_GRAPHS", "").strip()
    if not raw:
        return CAPACITY
    if not raw.isdigit():
        raise ParameterError("NWS_KEPT_GRAPHS", f"{raw!r} is not a count of graphs (0 or more)")
    return int(raw)


def copy_values(sources: Sequence[Any], targets: Sequence[Any]) -> None:
    """Assign each source variable's value to its target (same count, same shapes)."""
    if len(sources) != len(targets):
        raise ValueError(f"a kept model has {len(targets)} variables, the net's own {len(sources)}")
    for source, target in zip(sources, targets, strict=True):
        if tuple(source.shape) != tuple(target.shape) or source.name != target.name:
            raise ValueError(f"kept variable {target.path} {tuple(target.shape)} is not the net's "
                             f"{source.path} {tuple(source.shape)}")  # fmt: skip
        target.assign(source.value)


MODELS = CompiledModels()
"""This process's kept models."""
