"""The released code's TF1 optimizers as Keras 3 optimizers (fidelity `paper`).

The published nets were trained with `tf.train.RMSPropOptimizer(lr)` and
`tf.train.AdamOptimizer(lr)` at their defaults:

- TF1 RMSProp starts its mean-square accumulator at **one** and adds epsilon 1e-10 inside the
  square root (the `ApplyRMSProp` kernel: `ms += (g^2 - ms) * (1 - rho)`,
  `mom = momentum * mom + lr * g / sqrt(ms + eps)`, `var -= mom`). Keras' `RMSprop` has the same
  formula but starts the accumulator at zero and has no argument to change that, so its first
  steps are 15-30 times larger (about `3.16 * lr * sign(g)` instead of `lr * g / sqrt(0.9)`).
  `TF1RMSprop` is that kernel as a Keras optimizer.
- TF1 Adam and Keras 3 Adam compute the same "epsilon hat" update; only the default epsilon
  differs (1e-8 against 1e-7), so `keras.optimizers.Adam(lr, epsilon=TF1_ADAM_EPSILON)` is TF1 Adam
  up to float32 rounding of the constants.
- Momentum SGD (0.95) is bit-identical in both at a constant rate: no change needed.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

TF1_RMSPROP_EPSILON = 1e-10
TF1_RMSPROP_RHO = 0.9
TF1_ADAM_EPSILON = 1e-8


@keras.saving.register_keras_serializable(package="nws")
class TF1RMSprop(keras.optimizers.Optimizer):
    """RMSProp as TF1's `RMSPropOptimizer`: mean square initialised to 1, epsilon inside the sqrt."""

    def __init__(
        self,
        learning_rate: Any = 0.001,
        rho: float = TF1_RMSPROP_RHO,
        momentum: float = 0.0,
        epsilon: float = TF1_RMSPROP_EPSILON,
        name: str = "tf1_rmsprop",
        **kwargs: Any,
    ) -> None:
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.rho = rho
        self.momentum = momentum
        self.epsilon = epsilon

    def build(self, var_list: list[Any]) -> None:
        if self.built:
            return
        super().build(var_list)
        # TF1's _create_slots: a ones initializer for "rms", zeros for "momentum".
        self._mean_squares = self.add_optimizer_variables(var_list, "rms", initializer="ones")
        self._moments = self.add_optimizer_variables(var_list, "momentum", initializer="zeros")

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
        dtype = variable.dtype
        lr = ops.cast(learning_rate, dtype)
        gradient = ops.cast(gradient, dtype)
        index = self._get_variable_index(variable)
        mean_square, moment = self._mean_squares[index], self._moments[index]
        rho = ops.cast(self.rho, dtype)
        self.assign_add(mean_square, ops.multiply(ops.subtract(ops.square(gradient), mean_square), 1 - rho))
        step = ops.divide(ops.multiply(gradient, lr), ops.sqrt(ops.add(mean_square, self.epsilon)))
        self.assign(moment, ops.add(ops.multiply(ops.cast(self.momentum, dtype), moment), step))
        self.assign_sub(variable, moment)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({"rho": self.rho, "momentum": self.momentum, "epsilon": self.epsilon})
        return config
