"""How closely a net's training follows the released NWS code: `paper` (the default) or `clean`.

`paper` reproduces what the published nets were trained with, where it shapes the weights:
TF1 RMSProp and Adam epsilon, batch norm on batch statistics in every forward pass (evaluation
included, so the exported moving statistics come from evaluation batches), evaluation in batches
of the net's batch size and on augmented images when augmentation is on, gamma drawn from
N(1, 0.002), early stopping from epoch `min_epochs - 1`, and the MNIST/Fashion pool without the
first 5,000 official training images. `clean` is the textbook variant: Keras defaults, evaluation
with the moving statistics on clean images, snapshot 1 the pure initialisation. The README's
section "How close to the released code" lists every difference and its status.
"""

from __future__ import annotations

from nws.errors import ParameterError

PAPER = "paper"
CLEAN = "clean"
FIDELITIES = (PAPER, CLEAN)
DEFAULT_FIDELITY = PAPER


def check_fidelity(value: str, name: str = "fidelity") -> str:
    """The value when it names a fidelity; a ParameterError naming the parameter otherwise."""
    if value not in FIDELITIES:
        raise ParameterError(name, f"{value!r} is not one of {', '.join(FIDELITIES)}")
    return value
