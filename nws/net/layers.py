"""The released code's batch norm as a Keras 3 layer (fidelity `paper`).

The released graph is built once in training mode, and every TensorLayer `BatchNormLayer` in it
has `is_train=True`: it normalises with the moments of the batch at hand (biased variance) and,
because the moving-average updates are control dependencies of its output, updates
`moving_mean` and `moving_variance` (decay 0.9, no zero-debias) on *every* forward pass, the
evaluation of validation and test accuracy included. The moving statistics are never used to
compute anything, but every exported snapshot holds them. Its defaults: epsilon 1e-5, beta 0,
gamma drawn from N(1, 0.002) (not truncated), moving mean 0, moving variance 1.

Keras' `BatchNormalization` does exactly this when called with `training=True`, but a functional
model passes its own flag to every layer, so `evaluate` and `predict` would switch it to the
moving statistics. `BatchStatisticsNormalization` forces `training=True`. Dropout keeps following
the model's flag: on in `fit`, off in `evaluate`/`predict`, as the released `keep_prob` 0.5 / 1.0.
"""

from __future__ import annotations

from typing import Any

import keras

TL_GAMMA_MEAN = 1.0
TL_GAMMA_STDDEV = 0.002


@keras.saving.register_keras_serializable(package="nws")
class BatchStatisticsNormalization(keras.layers.BatchNormalization):
    """Batch norm that always normalises with batch moments and always updates its moving
    statistics (TensorLayer's BatchNormLayer with is_train=True), gamma from N(1, 0.002)."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault(
            "gamma_initializer", keras.initializers.RandomNormal(mean=TL_GAMMA_MEAN, stddev=TL_GAMMA_STDDEV)
        )
        super().__init__(**kwargs)

    def call(self, inputs: Any, training: Any = None, mask: Any = None) -> Any:
        return super().call(inputs, training=True, mask=mask)
