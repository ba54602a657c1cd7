"""Nets trained on kept compiled models (`nws.net.compiled`) against the same nets built fresh, for
every property value, on the backend of the calling process (tests/test_training.py runs it on
TensorFlow, tests/jax_checks.py on JAX)."""

from __future__ import annotations

import numpy as np

from nws.data import load_images, split_for_net
from nws.net.compiled import CompiledModels
from nws.net.training import TrainSettings, train_net
from nws.space import NetConfig

FIXED = "filter_size=5,depth_conv=3,depth_fc=2,width_conv=8,width_fc=128"
SMALL = "filter_size=3,depth_conv=4,depth_fc=3,width_conv=4,width_fc=64"
PAIRS = [
    # (graph: activation, optimizer, augmentation, architecture), the net compared (trained
    # first on models of its own, then again on the kept models), and the net trained between.
    # Over the compared nets every property takes every value.
    (("relu", "adam", "off", FIXED), ("shapes", 64, "normal"), ("digits", 32, "glorot_uniform")),
    (("elu", "rmsprop", "on", FIXED), ("gratings", 256, "glorot_normal"), ("mnist5k", 128, "constant")),
    (("sigmoid", "momentum", "off", FIXED), ("digits", 128, "constant"), ("shapes", 256, "normal")),
    (("tanh", "adam", "on", FIXED), ("mnist5k", 32, "glorot_normal"), ("gratings", 64, "glorot_uniform")),
    (("relu", "momentum", "off", SMALL), ("gratings", 32, "glorot_uniform"), ("digits", 64, "normal")),
]
SETTINGS = TrainSettings(max_epochs=2, min_epochs=2)


def config(graph: tuple[str, ...], net: tuple, lrate: float) -> NetConfig:
    activation, optimizer, augmentation, architecture = graph
    dataset, batch_size, initialization = net
    return NetConfig.parse(
        f"dataset={dataset},lrate={lrate},batch_size={batch_size},batch_norm=on,"
        f"augmentation={augmentation},optimizer={optimizer},activation={activation},"
        f"initialization={initialization},{architecture}"
    )


def trained(net: NetConfig, seed: int, kept: CompiledModels | None) -> tuple[np.ndarray, list]:
    """The net's weights at every evaluation and its metrics (without wall times)."""
    data = split_for_net(load_images(net.dataset), seed, 128, 32)
    weights = []

    def record(model, _epoch, _metrics) -> None:
        weights.append(np.concatenate([np.ravel(np.asarray(w)) for w in model.get_weights()]))

    result = train_net(net, data, seed, SETTINGS, [record], kept=kept)
    history = [{k: v for k, v in h.items() if k != "elapsed_seconds"} for h in result.history]
    return np.stack(weights), history


def kept_versus_fresh() -> dict:
    """Per graph: a net built fresh (its models then kept), another net on those models, then
    the first net again on them; is the second training of the first net its first, bit for bit?"""
    kept = CompiledModels()
    identical = []
    for i, (graph, compared, between) in enumerate(PAIRS):
        net, seed = config(graph, compared, 0.004 - 0.0007 * i), 100 + 2 * i
        fresh_weights, fresh_history = trained(net, seed, kept)
        trained(config(graph, between, 0.001 + 0.0005 * i), seed + 1, kept)
        weights, history = trained(net, seed, kept)
        identical.append(
            bool(np.array_equal(weights, fresh_weights, equal_nan=True)) and history == fresh_history
        )
    return {"hits": kept.hits, "misses": kept.misses, "identical": identical, "evaluations": len(weights)}
