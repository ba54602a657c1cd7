"""The robustness protocol of `train` (issue 18): the test nets transformed at random without
changing their function (`nws.net.symmetry`), then evaluated again, so that every model's figure on
the transformed nets stands beside its figure on the nets as they were trained.

- `permute`: every hidden layer's units renumbered, one random renumbering per net, applied to
  all its snapshots (any activation).
- `rescale`: every hidden unit of a ReLU net scaled by a random factor in [0.5, 2] and its
  outgoing weights by the inverse, one draw per net. No other activation of the space is
  positively homogeneous, so a non-ReLU net has no such symmetry: it is left as it is, and the
  number of nets actually rescaled is reported (`n_rescaled`).

The transformed snapshots go to files in a temporary directory, behind a zoo whose other nets
are the original files, so the evaluation runs unchanged on them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from nws.net import symmetry
from nws.net.snapshots import WeightLayout, architecture_for_length, weight_layout
from nws.zoo.store import Zoo

TRANSFORMS = ("permute", "rescale")


def net_layout(n_weights: int, shared: WeightLayout | None) -> WeightLayout:
    """A net's layout: from its length for the NWS family, else the selection's shared one."""
    if shared is not None and shared.n_weights == n_weights:
        return shared
    return weight_layout(architecture_for_length(n_weights))


def _transform(
    name: str, layout: WeightLayout, activation: str, rng: np.random.Generator
) -> Callable[[np.ndarray], np.ndarray] | None:
    """One net's random transformation, drawn once for all its snapshots (None: left as it is)."""
    if name == "permute":
        order = symmetry.random_permutations(layout, rng)
        return lambda vector: symmetry.apply_permutations(vector, layout, order)
    if activation not in symmetry.HOMOGENEOUS_ACTIVATIONS:
        return None
    scales = symmetry.random_scales(layout, rng)
    return lambda vector: symmetry.apply_scales(vector, layout, scales, activation=activation)


def transformed_zoo(
    zoo: Zoo,
    nets: Sequence[int],
    k_range: tuple[int, int],
    name: str,
    layout: WeightLayout | None,
    activations: Sequence[str],
    seed: int,
    directory: Path,
) -> tuple[Zoo, int]:
    """A zoo whose listed nets have the snapshots of the K range transformed by `name` (one of
    TRANSFORMS), and how many nets were transformed."""
    table = zoo.nets.copy()
    changed = 0
    for net in nets:
        net = int(net)
        rng = np.random.default_rng([seed, net, TRANSFORMS.index(name)])
        transform = _transform(name, net_layout(int(zoo.lengths[net]), layout), activations[net], rng)
        if transform is None:
            continue
        prints = int(table["prints"].iloc[net])
        rows = np.stack([zoo.snapshot(net, k) for k in range(1, prints + 1)])
        for k in range(k_range[0], k_range[1] + 1):
            rows[k - 1] = transform(rows[k - 1])
        path = directory / f"{name}-{net}.f32"
        rows.astype(np.float32).tofile(path)
        table.loc[table.index[net], ["path", "data_offset"]] = [str(path), 0]
        changed += 1
    return Zoo(directory, table.to_csv(index=False)), changed
