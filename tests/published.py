"""Writes small nets in the published NWS layout, from its description alone (not our exporter),
including the broken cases an importer must refuse."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd

COLUMNS = ("dataset", "lrate", "batch_size", "batch_norm", "augmentation", "optimizer", "activation",
           "initialization", "filter_size", "depth_conv", "depth_fc", "width_conv", "width_fc")  # fmt: skip


def conv_fc_sizes(k: int, depth_conv: int, depth_fc: int, width_conv: int, width_fc: int) -> tuple[int, int]:
    """weightn_conv, weightn_fc by the reference's rules (kernel, bias, 4 batch-norm vectors)."""
    blocks = {3: [1, 1, 1], 4: [1, 1, 2], 5: [1, 2, 2]}[depth_conv]
    conv, channels = 0, 3
    for b, n in enumerate(blocks):
        for _ in range(n):
            out = width_conv * 2**b
            conv += k * k * channels * out + out + 4 * out
            channels = out
    fc, features = 0, 16 * channels
    for c in range(depth_fc):
        units = int(width_fc * 2.0**-c)
        fc += features * units + units + 4 * units
        features = units
    return conv, fc + features * 20 + 20


def write_net(directory: Path, values: list, weights: np.ndarray, n_evals: int = 30) -> None:
    """meta.csv, weights/001..NNN.bin (float64), error.bin [n_evals, 5], stat.bin [4]."""
    (directory / "weights").mkdir(parents=True)
    with open(directory / "meta.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        writer.writerow(values)
    for k, row in enumerate(weights, start=1):
        np.asarray(row, dtype=np.float64).tofile(directory / "weights" / f"{k:03d}.bin")
    steps = np.arange(n_evals) * 100.0
    error = 90.0 * np.exp(-np.arange(n_evals) / 5.0)
    table = np.column_stack([steps, error, error + 1, error + 2, error + 1.5])
    table.tofile(directory / "error.bin")
    np.array([n_evals, steps[-1], n_evals - 1.0, 123.5]).tofile(directory / "stat.bin")


def published_weights(size: int, seed: int, prints: int = 20, scale: float = 1.0) -> np.ndarray:
    """float64 snapshots whose values are exact float32 numbers (TensorFlow's float32 weights)."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((prints, size)) * scale).astype(np.float32).astype(np.float64)


def write_index(path: Path, rows: list[dict]) -> Path:
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def index_row(values: list, sizes: tuple[int, int], path: str) -> dict:
    return {**dict(zip(COLUMNS, values, strict=True)), "weightn_conv": sizes[0], "weightn_fc": sizes[1],
            "path": path}  # fmt: skip
