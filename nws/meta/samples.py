"""Samples of the meta-dataset and the slices cut from them.

A sample is one snapshot (net, k) of a net; a slice is `length` consecutive raw weights (no
normalisation) of a sample, starting anywhere inside the chosen region (reference section 8).
A contiguous region is read from the zoo's files in place; the `nonkernel` region (1-2 % of a
net's weights) is gathered once into memory, laid end to end, and its slices cut from there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nws.net.regions import CONTIGUOUS_REGIONS, region_bounds, region_segments
from nws.net.snapshots import WeightLayout
from nws.zoo.store import Zoo


@dataclass
class Samples:
    """The snapshots of a set of nets within a snapshot range, with their slice bounds."""

    zoo: Zoo
    net: np.ndarray  # zoo net index per sample
    k: np.ndarray  # snapshot index (1-based) per sample
    label: np.ndarray  # class index or learning rate per sample
    length: int
    low: np.ndarray  # first allowed slice start (within the snapshot, or its region's values)
    high: np.ndarray  # last allowed slice start
    values: np.ndarray | None = None  # a non-contiguous region's values, every sample's end to end
    value_start: np.ndarray | None = None  # where each sample's values start in `values`

    @classmethod
    def of(
        cls,
        zoo: Zoo,
        nets: np.ndarray,
        labels: np.ndarray,
        k_range: tuple[int, int],
        region: str,
        length: int,
        layout: WeightLayout | None = None,
    ) -> Samples:
        """The samples of `nets` in snapshots `k_range`; `layout` names the tensors of an imported
        zoo's vectors (NWS vectors are known from their length), which `nonkernel` needs."""
        ks = np.arange(k_range[0], k_range[1] + 1)
        net = np.repeat(np.asarray(nets, np.int64), len(ks))
        k = np.tile(ks, len(nets))
        label = labels[net, k - 1] if labels.ndim == 2 else labels[net]  # per snapshot, or per net
        if region in CONTIGUOUS_REGIONS:
            start, stop = region_bounds(zoo.lengths, zoo.conv, region)
            return cls(zoo, net, k, label, length, start[net], stop[net] - length)
        values, value_start, sizes = region_values(zoo, net, k, region, layout)
        return cls(zoo, net, k, label, length, np.zeros_like(sizes), sizes - length, values, value_start)

    def __len__(self) -> int:
        return len(self.net)

    def row_starts(self) -> np.ndarray:
        """Where each sample's region starts: in the zoo, or in `values`."""
        if self.value_start is not None:
            return self.value_start
        return self.zoo.row_start(self.net, self.k)

    def _gather(self, starts: np.ndarray) -> np.ndarray:
        if self.values is None:
            return self.zoo.gather(starts, self.length)
        return self.values[np.asarray(starts, np.int64)[:, None] + np.arange(self.length)]

    def subset(self, index: np.ndarray) -> Samples:
        """The listed samples only (their region values stay shared)."""
        starts = None if self.value_start is None else self.value_start[index]
        return Samples(self.zoo, self.net[index], self.k[index], self.label[index], self.length,
                       self.low[index], self.high[index], self.values, starts)  # fmt: skip

    def random_slices(self, index: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One slice per listed sample, each at a start drawn uniformly in its region."""
        offsets = rng.integers(self.low[index], self.high[index] + 1)
        return self._gather(self.row_starts()[index] + offsets)

    def even_starts(self, count: int) -> np.ndarray:
        """[samples, count] evenly spaced starts covering each region."""
        fractions = np.linspace(0.0, 1.0, count)
        return np.round(self.low[:, None] + (self.high - self.low)[:, None] * fractions).astype(np.int64)

    def even_slices(self, sample: int, starts: np.ndarray) -> np.ndarray:
        return self._gather(self.row_starts()[sample] + starts)

    def batch(self, index: int, batch_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Batch `index` of an endless shuffled stream: a new order of the samples every pass, a
        new random slice of every sample every time. Made from (seed, index) alone, so any thread
        may make any batch and the stream is the same."""
        per_pass = max(1, len(self) // batch_size)
        epoch, position = divmod(index, per_pass)
        order = np.random.default_rng([seed, epoch]).permutation(len(self))
        chosen = order[position * batch_size : (position + 1) * batch_size]
        return self.random_slices(chosen, np.random.default_rng([seed, epoch, position])), self.label[chosen]


def region_values(
    zoo: Zoo, net: np.ndarray, k: np.ndarray, region: str, layout: WeightLayout | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every sample's values of a non-contiguous region, end to end: (values, where each sample's
    start, how many each has). Read run by run of the region (one per layer for `nonkernel`), all
    samples of one vector length at once; a net whose layout is unknown is a ValueError."""
    sizes = np.zeros(len(net), np.int64)
    runs_of: dict[int, np.ndarray] = {}
    for n_weights, conv in {(int(zoo.lengths[i]), int(zoo.conv[i])) for i in np.unique(net)}:
        runs_of[n_weights] = region_segments(n_weights, conv, region, layout)
    lengths = zoo.lengths[net]
    for n_weights, runs in runs_of.items():
        sizes[lengths == n_weights] = int((runs[:, 1] - runs[:, 0]).sum())
    value_start = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    values = np.empty(int(sizes.sum()), np.float32)
    row_start = zoo.row_start(net, k)
    for n_weights, runs in runs_of.items():
        group = np.flatnonzero(lengths == n_weights)
        at = 0
        for a, b in runs:
            block = zoo.gather(row_start[group] + a, int(b - a))
            values[value_start[group][:, None] + at + np.arange(b - a)] = block
            at += int(b - a)
    return values, value_start, sizes
