"""The layout of Google's Small CNN Zoo (Unterthiner et al., 2020), for nets that share one
architecture, so readers written for that dataset load our zoos:

  weights.npy       float32 [rows, n_weights]: one row per net and snapshot; each tensor in its
                    own (Keras) shape, flattened row-major, tensors in the order of layout.csv;
  metrics.csv.gz    one row per row of weights.npy: `modelindex`, `run_id`, the snapshot's epoch
                    as `step`, `train_accuracy`, `test_accuracy`, `train_loss`, `test_loss`, and
                    the hyper-parameters as `config.<name>`;
  layout.csv        `varname`, `start_idx`, `end_idx`, `shape`: weights[:, start_idx:end_idx]
                    reshaped to `shape` is the variable `varname`.

Unlike our flat vector (kernels transposed so one neuron's weights are adjacent), tensors here keep
their native order, which is what that layout's readers reshape.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from nws.snapshots import WeightLayout

LAYOUT_COLUMNS = ("varname", "start_idx", "end_idx", "shape")


def layout_table(layout: WeightLayout) -> pd.DataFrame:
    rows = []
    start = 0
    for entry in layout:
        rows.append({"varname": f"{entry.keras_layer}/{entry.tensor}:0", "start_idx": start,
                     "end_idx": start + entry.size, "shape": str(tuple(entry.shape))})  # fmt: skip
        start += entry.size
    return pd.DataFrame(rows, columns=list(LAYOUT_COLUMNS))


def to_native(vectors: np.ndarray, layout: WeightLayout) -> np.ndarray:
    """Rows of our flat vectors, each tensor rewritten in its native row-major order."""
    vectors = np.atleast_2d(vectors)
    out = np.empty_like(vectors, dtype=np.float32)
    for entry in layout:
        block = vectors[:, entry.offset : entry.stop]
        out[:, entry.offset : entry.stop] = np.stack([np.ravel(entry.from_storage(row)) for row in block])
    return out


def write(
    directory: Path, layout: WeightLayout, nets: Iterable[tuple[np.ndarray, pd.DataFrame]], rows: int
) -> None:
    """Stream (snapshots [prints, n] in our layout, their metrics rows) per net into the files."""
    directory.mkdir(parents=True, exist_ok=True)
    weights = np.lib.format.open_memmap(
        directory / "weights.npy", mode="w+", dtype=np.float32, shape=(rows, layout.n_weights)
    )
    frames, at = [], 0
    for vectors, metrics in nets:
        weights[at : at + len(vectors)] = to_native(vectors, layout)
        frames.append(metrics)
        at += len(vectors)
    weights.flush()
    del weights
    pd.concat(frames, ignore_index=True).to_csv(directory / "metrics.csv.gz", index=False)
    layout_table(layout).to_csv(directory / "layout.csv", index=False)
