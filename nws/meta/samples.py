"""Samples of the meta-dataset and the slices cut from them.

A sample is one snapshot (net, k) of a net; a slice is `length` consecutive raw weights (no
normalisation) of a sample, starting anywhere inside the chosen region (reference section 8).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nws.net.snapshots import region_bounds
from nws.zoo.store import Zoo


@dataclass
class Samples:
    """The snapshots of a set of nets within a snapshot range, with their slice bounds."""

    zoo: Zoo
    net: np.ndarray  # zoo net index per sample
    k: np.ndarray  # snapshot index (1-based) per sample
    label: np.ndarray  # class index or learning rate per sample
    length: int
    low: np.ndarray  # first allowed slice start (within the snapshot)
    high: np.ndarray  # last allowed slice start

    @classmethod
    def of(
        cls,
        zoo: Zoo,
        nets: np.ndarray,
        labels: np.ndarray,
        k_range: tuple[int, int],
        region: str,
        length: int,
    ) -> Samples:
        ks = np.arange(k_range[0], k_range[1] + 1)
        net = np.repeat(np.asarray(nets, np.int64), len(ks))
        k = np.tile(ks, len(nets))
        start, stop = region_bounds(zoo.lengths, zoo.conv, region)
        label = labels[net, k - 1] if labels.ndim == 2 else labels[net]  # per snapshot, or per net
        return cls(zoo, net, k, label, length, start[net], stop[net] - length)

    def __len__(self) -> int:
        return len(self.net)

    def row_starts(self) -> np.ndarray:
        return self.zoo.row_start(self.net, self.k)

    def random_slices(self, index: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One slice per listed sample, each at a start drawn uniformly in its region."""
        offsets = rng.integers(self.low[index], self.high[index] + 1)
        return self.zoo.gather(self.row_starts()[index] + offsets, self.length)

    def even_starts(self, count: int) -> np.ndarray:
        """[samples, count] evenly spaced starts covering each region."""
        fractions = np.linspace(0.0, 1.0, count)
        return np.round(self.low[:, None] + (self.high - self.low)[:, None] * fractions).astype(np.int64)

    def even_slices(self, sample: int, starts: np.ndarray) -> np.ndarray:
        return self.zoo.gather(self.row_starts()[sample] + starts, self.length)

    def batch(self, index: int, batch_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Batch `index` of an endless shuffled stream: a new order of the samples every pass, a
        new random slice of every sample every time. Made from (seed, index) alone, so any thread
        may make any batch and the stream is the same."""
        per_pass = max(1, len(self) // batch_size)
        epoch, position = divmod(index, per_pass)
        order = np.random.default_rng([seed, epoch]).permutation(len(self))
        chosen = order[position * batch_size : (position + 1) * batch_size]
        return self.random_slices(chosen, np.random.default_rng([seed, epoch, position])), self.label[chosen]
