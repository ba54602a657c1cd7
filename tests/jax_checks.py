"""Checks that need the JAX backend, run by tests/test_backend.py in a process of their own (a
process has one Keras backend; the test process runs TensorFlow). Each prints one JSON line."""

from __future__ import annotations

import dataclasses
import json
import sys

import numpy as np

from nws.backend import select

select("jax")  # before Keras starts; also JAX's compilation cache, as `sample --backend jax`

from nws.data import load_images, split_for_net  # noqa: E402
from nws.net.pack import PackTrainer  # noqa: E402
from nws.net.snapshots import flatten, weight_layout  # noqa: E402
from nws.net.training import TrainingDiverged, TrainSettings, build_net, seed_backend, train_net  # noqa: E402
from nws.space import NetConfig  # noqa: E402

CONFIG = NetConfig.parse("shapes,0.003,32,1,1,2,0,2,5,3,2,8,128")
"""Fixed architecture, augmentation on, momentum SGD, ReLU (the paper fidelity's evaluation then
runs on augmented images, the most state a packed net must carry)."""


def lone_step(config: NetConfig, data, seed: int, settings: TrainSettings) -> np.ndarray:
    """A net's weights after one optimizer step on its first batch, trained alone by Keras."""
    seed_backend(seed)
    built = build_net(config, data, seed, settings)
    x, y = next(built.train_source)
    built.fitted.train_on_batch(x, y)
    return flatten(built.net, weight_layout(config))


def pack_equivalence() -> dict:
    """Three nets (other seeds, rates, data, one diverging): initial weights, one step, NaN."""
    images = load_images("shapes", None, False)
    seeds = [11, 12, 13]
    configs = [CONFIG, dataclasses.replace(CONFIG, lrate=0.001), dataclasses.replace(CONFIG, lrate=1e12)]
    data = [split_for_net(images, s, 300, 32) for s in seeds]
    layout = weight_layout(CONFIG)
    one_step = TrainSettings(max_epochs=1, min_epochs=1, fidelity="clean")
    trainer = PackTrainer(configs, data, seeds, one_step)
    initial = []
    for i in range(len(seeds)):
        trainer._load(i)
        initial.append(flatten(trainer.template.net, layout))
    alone_initial = []
    for config, d, s in zip(configs, data, seeds, strict=True):
        seed_backend(s)
        alone_initial.append(flatten(build_net(config, d, s, one_step).net, layout))
    index = np.zeros((3, trainer.batch), np.int32)
    for i, net in enumerate(trainer.nets):
        index[i] = trainer.rows[i][net.sampler.epoch()[: trainer.batch]]
    trainer.step(index)
    relative = []
    for i in range(2):
        trainer._load(i)
        packed = flatten(trainer.template.net, layout)
        alone = lone_step(configs[i], data[i], seeds[i], one_step)
        relative.append(float(np.linalg.norm(packed - alone) / np.linalg.norm(alone)))
    settings = TrainSettings(max_epochs=2, min_epochs=2)
    outcomes = PackTrainer(configs, data, seeds, settings).train([[], [], []])
    return {
        "initial_identical": [
            bool(np.array_equal(a, b)) for a, b in zip(initial, alone_initial, strict=True)
        ],
        "one_step_relative": relative,
        "outcomes": [type(o).__name__ for o in outcomes],
        "diverged_epoch": [o.epoch for o in outcomes if isinstance(o, TrainingDiverged)],
        "epochs": [o.epochs for o in outcomes if not isinstance(o, TrainingDiverged)],
        "tensorflow_imported": "tensorflow" in sys.modules,
    }


AGREEMENT_NETS = 16
AGREEMENT_RATES = (0.002, 0.003, 0.004, 0.005)


def agreement() -> dict:
    """16 nets (seeds 100..115, four learning rates, each its own images of `digits`, which
    nets this small learn in a few epochs) trained for 3 epochs in one pack and each alone:
    their final test accuracies and test-set sizes."""
    images = load_images("digits", None, False)
    seeds = list(range(100, 100 + AGREEMENT_NETS))
    configs = [
        dataclasses.replace(CONFIG, dataset="digits", lrate=AGREEMENT_RATES[i % 4])
        for i in range(AGREEMENT_NETS)
    ]
    data = [split_for_net(images, s, 320, 200) for s in seeds]
    settings = TrainSettings(max_epochs=3, min_epochs=3)
    packed = PackTrainer(configs, data, seeds, settings).train([[] for _ in seeds])
    alone = [train_net(c, d, s, settings) for c, d, s in zip(configs, data, seeds, strict=True)]
    return {
        "packed": [r.history[-1]["test_accuracy"] for r in packed],
        "alone": [r.history[-1]["test_accuracy"] for r in alone],
        "epochs": [[r.epochs for r in packed], [r.epochs for r in alone]],
        "n_test": [len(d.y_test) for d in data],
    }


def lone_twice() -> dict:
    """Same seed twice on JAX: identical snapshots; and no TensorFlow imported by training."""
    images = load_images("shapes", None, False)
    data = split_for_net(images, 5, 300, 32)
    settings = TrainSettings(max_epochs=1, min_epochs=1)
    runs = []
    layout = weight_layout(CONFIG)
    for _ in range(2):
        snaps: list[np.ndarray] = []
        train_net(CONFIG, data, 5, settings, [lambda m, e, x, s=snaps: s.append(flatten(m, layout))])
        runs.append(np.stack(snaps))
    return {"identical": bool(np.array_equal(*runs)), "tensorflow_imported": "tensorflow" in sys.modules}


def kept() -> dict:
    """tests/kept_models.py on JAX."""
    from tests.kept_models import kept_versus_fresh

    return {**kept_versus_fresh(), "tensorflow_imported": "tensorflow" in sys.modules}


CHECKS = {"pack": pack_equivalence, "twice": lone_twice, "agreement": agreement, "kept": kept}

if __name__ == "__main__":  # one process for several checks: JAX starts once
    print(json.dumps({name: CHECKS[name]() for name in sys.argv[1:]}))
