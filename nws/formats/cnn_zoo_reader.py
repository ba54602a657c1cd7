"""Reading a Small CNN Zoo directory (Unterthiner et al., 2020, as published and as
`nws.formats.small_cnn_zoo` writes it), one net at a time:

  weights.npy     [rows, n_weights], one row per checkpoint of a net, each tensor flattened
                  row-major in its own (TensorFlow) shape; opened memory-mapped, never read whole;
  metrics.csv.gz  one row per row of weights.npy: `step` (the checkpoint's epoch: 0, 1, 2, 3, 20,
                  40, 60, 80, 86 in the published zoo), `test_accuracy`, `train_accuracy`,
                  `test_loss`, `train_loss`, the hyper-parameters as `config.<name>`, and what
                  tells the nets apart: `modeldir` (published), else `run_id` or `modelindex`;
  layout.csv      `varname`, `start_idx`, `end_idx`, `shape`: weights[:, start_idx:end_idx]
                  reshaped to `shape` is the variable `varname` (e.g. `sequential/conv2d/kernel:0`).

A net is the rows of one `modeldir` (or id), its checkpoints in step order. Its vectors are
rewritten in our layout (`nws.net.snapshots`: kernels transposed so that a unit's incoming weights are
adjacent, conv part first), with a `WeightLayout` built from layout.csv: a 4-D kernel starts a
conv layer, a 2-D one a dense layer, and the tensors after a kernel (bias, batch norm) belong to
its layer. What is wrong with the directory is a DataError; what is wrong with one net is
`ZooNetRefused`, and the others go on.
"""

from __future__ import annotations

import ast
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from nws.errors import DataError
from nws.net.snapshots import BN_TENSORS, TensorEntry, WeightLayout

FILES = ("weights.npy", "metrics.csv.gz", "layout.csv")
NET_KEYS = ("modeldir", "run_id", "modelindex")
"""The metrics columns that name a row's net, in order of preference."""
ACCURACIES = ("train_accuracy", "test_accuracy")
HISTORY_COLUMNS = {"train_accuracy": "train_accuracy", "test_accuracy": "test_accuracy",
                   "train_loss": "loss", "test_loss": "test_loss"}  # fmt: skip
"""metrics.csv.gz column -> our per-epoch metric name."""
TENSORS = ("kernel", "bias", *BN_TENSORS)


class ZooNetRefused(Exception):
    """A net of the zoo that cannot be imported, with the reason."""


@dataclass(frozen=True)
class ZooNet:
    """One net, read and checked: its checkpoints in our layout, step order."""

    key: str
    weights: np.ndarray  # float32 [checkpoints, n_weights], our layout
    snapshots: list[dict[str, Any]]  # per checkpoint: snapshot, epoch, step and the metrics
    config: dict[str, str]  # config.<name> -> value
    checksum: str  # xxh3-128 of the net's rows of weights.npy and metrics.csv.gz


def _read_layout(path: Path) -> tuple[pd.DataFrame, WeightLayout]:
    """layout.csv and our layout of the same tensors."""
    try:
        table = pd.read_csv(path)
        missing = [c for c in ("varname", "start_idx", "end_idx", "shape") if c not in table.columns]
        if missing:
            raise ValueError(f"no column {', '.join(missing)}")
        table = table.sort_values("start_idx", kind="stable").reset_index(drop=True)
        shapes = [tuple(int(n) for n in ast.literal_eval(str(s))) for s in table["shape"]]
    except (OSError, ValueError, SyntaxError, TypeError) as e:
        raise DataError(f"{path}: not a Small CNN Zoo layout ({type(e).__name__}: {e})") from None
    entries, offset, layer, part, seen_fc = [], 0, "", "conv", False
    for row, shape in zip(table.itertuples(), shapes, strict=True):
        keras_layer, _, tensor = str(row.varname).rpartition("/")
        tensor = tensor.split(":")[0]
        size = math.prod(shape)
        where = f"{path}: {row.varname}"
        if int(row.start_idx) != offset or int(row.end_idx) - int(row.start_idx) != size:
            raise DataError(f"{where}: columns {row.start_idx}..{row.end_idx} do not follow on at {offset} "
                            f"with the {size} values of shape {shape}")  # fmt: skip
        if tensor not in TENSORS or not keras_layer:
            raise DataError(f"{where}: not a layer's {', '.join(TENSORS)}")
        if tensor == "kernel":
            if len(shape) not in (2, 4):
                raise DataError(f"{where}: a kernel of shape {shape} is neither conv nor dense")
            layer, part = keras_layer, "conv" if len(shape) == 4 else "fc"
            seen_fc |= part == "fc"
            if seen_fc and part == "conv":
                raise DataError(f"{where}: a conv layer after a dense one; the conv part must come first")
        elif not layer:
            raise DataError(f"{where}: comes before any kernel")
        stored = shape if tensor != "kernel" else (shape[::-1] if len(shape) == 2 else
                                                   (shape[3], shape[2], shape[0], shape[1]))  # fmt: skip
        entries.append(TensorEntry(layer, tensor, keras_layer, shape, stored, offset, size, part))
        offset += size
    if not entries:
        raise DataError(f"{path}: names no tensor")
    return table, WeightLayout(tuple(entries))


def to_ours(rows: np.ndarray, layout: WeightLayout) -> np.ndarray:
    """Checkpoint rows in the native (TensorFlow, row-major) order, rewritten in our layout."""
    out = np.empty(rows.shape, np.float32)
    for e in layout:
        block = np.asarray(rows[:, e.offset : e.stop], np.float32).reshape(len(rows), *e.shape)
        if e.tensor == "kernel":
            block = block.transpose(0, 4, 3, 1, 2) if block.ndim == 5 else block.transpose(0, 2, 1)
        out[:, e.offset : e.stop] = block.reshape(len(rows), -1)
    return out


class CnnZoo:
    """An opened Small CNN Zoo directory: its layout, its metrics table and its weights mapped."""

    def __init__(self, directory: Path) -> None:
        for name in FILES:
            if not (directory / name).is_file():
                raise DataError(
                    f"{directory}: no {name} (a Small CNN Zoo directory holds {', '.join(FILES)})"
                )
        self.directory = directory
        self.native, self.layout = _read_layout(directory / "layout.csv")
        try:
            self.weights = np.load(directory / "weights.npy", mmap_mode="r", allow_pickle=False)
            self.metrics = pd.read_csv(directory / "metrics.csv.gz", low_memory=False)
        except (OSError, ValueError, EOFError) as e:  # incl. pandas' parser errors
            raise DataError(f"{directory}: unreadable ({type(e).__name__}: {str(e)[:200]})") from None
        where = f"{directory}/weights.npy"
        if self.weights.ndim != 2 or self.weights.dtype.kind != "f":
            raise DataError(
                f"{where}: {self.weights.dtype} of shape {self.weights.shape}, not a float matrix"
            )
        if self.weights.shape[1] != self.layout.n_weights:
            raise DataError(
                f"{where}: {self.weights.shape[1]} columns, layout.csv names {self.layout.n_weights}"
            )
        if len(self.metrics) != len(self.weights):
            raise DataError(f"{directory}: metrics.csv.gz has {len(self.metrics)} rows, weights.npy "
                            f"{len(self.weights)}")  # fmt: skip
        missing = [c for c in ("step", *ACCURACIES) if c not in self.metrics.columns]
        if missing:
            raise DataError(f"{directory}/metrics.csv.gz: no column {', '.join(missing)}")
        key = next((k for k in NET_KEYS if k in self.metrics.columns), None)
        if key is None:
            raise DataError(f"{directory}/metrics.csv.gz: no column naming the nets ({', '.join(NET_KEYS)})")
        self.key = key
        self.config_columns = [c for c in self.metrics.columns if c.startswith("config.")]

    def nets(self) -> dict[str, np.ndarray]:
        """Each net's rows, nets in order of first appearance."""
        groups = self.metrics.groupby(self.metrics[self.key].astype(str), sort=False).indices
        return {name: np.asarray(rows) for name, rows in groups.items()}

    def common_checkpoints(self) -> int:
        """The number of checkpoints most nets have (the published zoo: 9)."""
        counts = pd.Series([len(r) for r in self.nets().values()])
        return int(counts.mode().max()) if len(counts) else 0

    def read(self, key: str, rows: np.ndarray, checkpoints: int) -> ZooNet:
        """Net `key` (its rows of the files), checked; `ZooNetRefused` with the reason otherwise."""
        import xxhash

        metrics = self.metrics.iloc[rows]
        # Step order; a zoo of ours may repeat a step (more snapshots than evaluations), which its
        # `snapshot` column orders.
        keys = [
            pd.to_numeric(metrics[c], errors="coerce").to_numpy()
            for c in ("snapshot", "step")
            if c in metrics
        ]
        order = np.lexsort(keys)
        rows, metrics = rows[order], metrics.iloc[order]
        steps = pd.to_numeric(metrics["step"], errors="coerce").to_numpy()
        if len(rows) != checkpoints:
            raise ZooNetRefused(f"{len(rows)} checkpoints, not {checkpoints}")
        if not np.isfinite(steps).all() or (steps < 0).any():
            raise ZooNetRefused(f"steps {list(metrics['step'])} are not all non-negative numbers")
        for column in ACCURACIES:
            values = pd.to_numeric(metrics[column], errors="coerce").to_numpy()
            if not (np.isfinite(values).all() and ((values >= 0) & (values <= 1)).all()):
                raise ZooNetRefused(f"{column} {list(metrics[column])} is not in [0, 1] at every checkpoint")
        config = {}
        for column in self.config_columns:
            values = metrics[column].astype(str).unique()
            if len(values) != 1:
                raise ZooNetRefused(f"{column} differs between its checkpoints ({', '.join(values[:3])})")
            config[column] = values[0]
        native = np.asarray(self.weights[rows], np.float32)  # these rows only, from the mapped file
        if not np.isfinite(native).all():
            raise ZooNetRefused("its weights hold NaN or infinite values")
        digest = xxhash.xxh3_128(native.tobytes())
        digest.update(metrics.to_csv(index=False).encode())
        snapshots = []
        for k, record in enumerate(metrics.to_dict("records"), start=1):
            values = {HISTORY_COLUMNS[c]: float(record[c]) for c in HISTORY_COLUMNS if c in record}
            snapshots.append({"snapshot": k, "epoch": float(record["step"]), "step": float(record["step"]),
                              **{n: v for n, v in values.items() if math.isfinite(v)}})  # fmt: skip
        return ZooNet(key, to_ours(native, self.layout), snapshots, config, digest.hexdigest())


def zoo_layout_document(net: ZooNet, layout: WeightLayout, native: pd.DataFrame) -> dict[str, Any]:
    """The content of an imported net's `snapshots/layout.json`: our layout's tensors, the zoo's
    own names and columns for them, its config and its checkpoints."""
    from nws.net.snapshots import LAYOUT_FORMAT

    return {
        "format": LAYOUT_FORMAT,
        "dtype": "float32",
        "order": (
            "layout.csv's tensors in its order; conv kernels [k,k,in,out] stored as [out,in,k,k], "
            "dense kernels [in,out] as [out,in], row-major"
        ),
        "source_format": "small-cnn-zoo",
        "config": net.config,
        "n_weights": layout.n_weights,
        "weightn_conv": layout.weightn_conv,
        "weightn_fc": layout.weightn_fc,
        "conv_fc_boundary": layout.weightn_conv,
        "tensors": layout.to_records(),
        "source_layout": native.astype({"start_idx": int, "end_idx": int}).to_dict("records"),
        "snapshots": net.snapshots,
    }
