"""The layout of Google's Small CNN Zoo (Unterthiner et al., 2020), for nets that share one
architecture, so readers written for that dataset load our zoos:

  weights.npy       float32 [rows, n_weights]: one row per net and snapshot; each tensor in its
                    own (Keras) shape, flattened row-major, tensors in the order of layout.csv;
  metrics.csv.gz    one row per row of weights.npy: `modelindex`, `run_id`, the snapshot's epoch
                    as `step`, `train_accuracy`, `test_accuracy`, `train_loss`, `test_loss`, and
                    the hyper-parameters as `config.<name>`;
  layout.csv        `varname`, `start_idx`, `end_idx`, `shape`: weights[:, start_idx:end_idx]
                    reshaped to `shape` is the variable `varname`.

With `kernels_only`, the batch-norm variables are left out (NFN's reader takes kernels and
biases only). Unlike our flat vector (kernels transposed so one neuron's weights are adjacent),
tensors here keep their native order, which is what that layout's readers reshape.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from nws.net.snapshots import TensorEntry, WeightLayout

LAYOUT_COLUMNS = ("varname", "start_idx", "end_idx", "shape")
CONFIG_NAMES = {
    "lrate": "config.learning_rate",
    "initialization": "config.w_init",
    "optimizer": "config.optimizer",
    "activation": "config.activation",
    "dataset": "config.dataset",
    "depth_conv": "config.num_layers",
    "width_conv": "config.num_units",
}
"""Our properties under the published zoo's column names where one means the same (its
`num_layers` and `num_units` are the conv layers and their width); the rest as `config.<name>`."""
KERNELS_AND_BIASES = ("kernel", "bias")


def config_column(name: str) -> str:
    return CONFIG_NAMES.get(name, f"config.{name}")


def written_entries(layout: WeightLayout, kernels_only: bool = False) -> list[TensorEntry]:
    """The tensors written: all, or (for readers that take nothing else, e.g. NFN's) kernels and
    biases only, leaving out the batch-norm variables."""
    return [e for e in layout if not kernels_only or e.tensor in KERNELS_AND_BIASES]


def layout_table(entries: Iterable[TensorEntry]) -> pd.DataFrame:
    rows = []
    start = 0
    for entry in entries:
        rows.append({"varname": f"{entry.keras_layer}/{entry.tensor}:0", "start_idx": start,
                     "end_idx": start + entry.size, "shape": str(tuple(entry.shape))})  # fmt: skip
        start += entry.size
    return pd.DataFrame(rows, columns=list(LAYOUT_COLUMNS))


def to_native(vectors: np.ndarray, entries: Iterable[TensorEntry]) -> np.ndarray:
    """Rows of our flat vectors, the listed tensors each in its native row-major order, one after
    the other."""
    vectors = np.atleast_2d(vectors)
    blocks = []
    for entry in entries:
        block = vectors[:, entry.offset : entry.stop]
        blocks.append(np.stack([np.ravel(entry.from_storage(row)) for row in block]).astype(np.float32))
    return np.concatenate(blocks, axis=1)


def write(
    directory: Path,
    layout: WeightLayout,
    nets: Iterable[tuple[np.ndarray, pd.DataFrame]],
    rows: int,
    kernels_only: bool = False,
) -> None:
    """Stream (snapshots [prints, n] in our layout, their metrics rows) per net into the files."""
    entries = written_entries(layout, kernels_only)
    directory.mkdir(parents=True, exist_ok=True)
    weights = np.lib.format.open_memmap(directory / "weights.npy", mode="w+", dtype=np.float32,
                                        shape=(rows, sum(e.size for e in entries)))  # fmt: skip
    frames, at = [], 0
    for vectors, metrics in nets:
        weights[at : at + len(vectors)] = to_native(vectors, entries)
        frames.append(metrics)
        at += len(vectors)
    weights.flush()
    del weights
    pd.concat(frames, ignore_index=True).to_csv(directory / "metrics.csv.gz", index=False)
    layout_table(entries).to_csv(directory / "layout.csv", index=False)
