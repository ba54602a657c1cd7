"""The regions of a flat weight vector that slices are cut from (reference section 8): all of it,
its conv part, its fc part, or the tensors that are not kernels, laid end to end. A region is a
list of [start, stop) runs of the vector (`region_segments`); a slice is `length` consecutive
values of the region, so for `nonkernel` it may span the bias and batch norm tensors of two layers.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from nws.net.snapshots import WeightLayout, vector_layout

CONTIGUOUS_REGIONS = ("all", "conv", "fc")
REGIONS = (*CONTIGUOUS_REGIONS, "nonkernel")
"""Parts of the flat vector slices are cut from: all of it, the conv part or the fc part (each one
run of the vector), or `nonkernel`: every tensor that is not a kernel (biases, batch norm's beta,
gamma and moving statistics), laid end to end in layout order. After a few epochs the kernels
(~99 % of the weights) still tell mostly how a net was initialised; these small tensors tell how
it was trained (benchmarks/signal_by_tensor.py)."""


def region_bounds(lengths: Any, conv: Any, region: str) -> tuple[np.ndarray, np.ndarray]:
    """Per vector, the [start, stop) of a contiguous `region` within it, from its length and its
    conv part's length (numbers or arrays)."""
    lengths, conv = np.asarray(lengths, np.int64), np.asarray(conv, np.int64)
    if region not in CONTIGUOUS_REGIONS and region in REGIONS:
        raise ValueError(f"the {region} region is not one run of the vector: use region_segments")
    if region == "all":
        return np.zeros_like(lengths), lengths.copy()
    if region == "conv":
        return np.zeros_like(lengths), conv.copy()
    if region == "fc":
        return conv.copy(), lengths.copy()
    raise ValueError(f"{region!r} is not one of {', '.join(REGIONS)}")


def region_segments(n_weights: int, conv: int, region: str, layout: WeightLayout | None = None) -> np.ndarray:
    """The [start, stop) runs of the vector that make up `region`, in order, as an [m, 2] array:
    one run for a contiguous region; for `nonkernel` one per layer (its bias and batch norm
    tensors follow each other), from the vector's layout (`vector_layout`)."""
    if region in CONTIGUOUS_REGIONS:
        start, stop = region_bounds(n_weights, conv, region)
        return np.array([[int(start), int(stop)]], np.int64)
    if region not in REGIONS:
        raise ValueError(f"{region!r} is not one of {', '.join(REGIONS)}")
    runs: list[list[int]] = []
    for entry in vector_layout(n_weights, layout):
        if not entry.in_region(region):
            continue
        if runs and runs[-1][1] == entry.offset:
            runs[-1][1] = entry.stop
        else:
            runs.append([entry.offset, entry.stop])
    return np.array(runs, np.int64).reshape(-1, 2)


def region_positions(
    n_weights: int, conv: int, region: str, layout: WeightLayout | None = None
) -> np.ndarray:
    """The vector positions of `region`, laid end to end: where a slice's values come from."""
    runs = region_segments(n_weights, conv, region, layout)
    return np.concatenate([np.arange(a, b) for a, b in runs]) if len(runs) else np.zeros(0, np.int64)


def region_size(n_weights: int, conv: int, region: str, layout: WeightLayout | None = None) -> int:
    """How many weights `region` spans in a vector: the longest slice it allows."""
    runs = region_segments(n_weights, conv, region, layout)
    return int((runs[:, 1] - runs[:, 0]).sum())
