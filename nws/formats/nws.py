"""The published NWS file layout (reference section 7): read it, with every check an importer
owes its users, and write it, so code written for the published dataset reads our zoos unchanged.

Per net, a directory with
  meta.csv              the 13 column names, then one row: dataset name, lrate, integer codes and
                        architecture values (the released files also hold True/False for the two
                        switches, which we read and never write);
  weights/001.bin ...   one raw little-endian float64 flat vector per snapshot (layout contract);
  error.bin             float64 [n_evals, 5]: step, train, validation, test error %, smoothed
                        validation error %;
  stat.bin              float64 [4]: evaluations, last step, epochs, seconds.
Per subset and split, an index CSV with the 13 columns, `weightn_conv`, `weightn_fc` and `path`.
The error row of snapshot k is round(linspace(0, n_evals - 1, prints))[k]
(`nws.net.snapshots.published_error_rows`).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xxhash

from nws.errors import DataError, NWSError, ParameterError
from nws.net.snapshots import weight_layout
from nws.space import PROPERTY_NAMES, NetConfig

INDEX_COLUMNS = (*PROPERTY_NAMES, "weightn_conv", "weightn_fc", "path")
PUBLISHED_PRINTS = 20


class PublishedNetRefused(NWSError):
    """A net that cannot be imported; the reason goes to the summary and the refusals CSV."""


@dataclass
class PublishedNet:
    """One net read from the published layout, checked."""

    config: NetConfig
    weights: np.ndarray  # float32 [prints, n_weights] (the published float64 values, exactly)
    errors: np.ndarray  # float64 [n_evals, 5]
    stat: np.ndarray  # float64 [4]
    weightn_conv: int
    checksum: str  # xxh3-128 over meta.csv, every snapshot, error.bin and stat.bin


def read_published_index(path: Path) -> pd.DataFrame:
    """An index CSV with at least the published columns; a DataError otherwise."""
    try:
        frame = pd.read_csv(path, dtype={"path": str})
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    missing = [c for c in INDEX_COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(f"{path} lacks the columns {', '.join(missing)}")
    return frame


def split_of(csv_path: Path) -> str:
    """`train` or `test` from a published index name (nws_main_train.csv), else empty."""
    stem = csv_path.stem.lower()
    return "train" if stem.endswith("train") else "test" if stem.endswith("test") else ""


def subset_of(csv_path: Path) -> str:
    stem = csv_path.stem.lower()
    return "fixed" if "fixed" in stem else "main" if "main" in stem else ""


def resolve_inside(root: Path, path: str | Path) -> Path:
    """`path` (relative to root, or absolute inside it) with links and `..` resolved; refused
    unless it stays inside the root. Every path that a CSV cell, a run's tag or a user string
    helps to build goes through here, on reading and on writing."""
    if not str(path).strip():
        raise PublishedNetRefused("empty path")
    root = root.resolve()
    candidate = Path(path)
    joined = candidate if candidate.is_absolute() else root / candidate
    try:
        resolved = joined.resolve(strict=False)
    except (OSError, RuntimeError) as e:
        raise PublishedNetRefused(f"path {str(path)!r} cannot be resolved ({e})") from None
    if resolved != root and root not in resolved.parents:
        raise PublishedNetRefused(f"path {str(path)!r} leads outside the root {root}")
    return resolved


def net_directory(root: Path, path: str) -> Path:
    """A published net's directory: `path` inside the root (see `resolve_inside`), a directory."""
    resolved = resolve_inside(root, path)
    if not resolved.is_dir():
        raise PublishedNetRefused(f"path {path!r} is not a directory")
    return resolved


def _read_meta(directory: Path) -> NetConfig:
    try:
        with open(directory / "meta.csv", newline="") as f:
            rows = list(csv.reader(f))
    except OSError as e:
        raise PublishedNetRefused(f"meta.csv unreadable ({e.strerror})") from None
    except (UnicodeDecodeError, csv.Error) as e:  # damaged: binary bytes, a NUL, a broken quote
        raise PublishedNetRefused(f"meta.csv is not a CSV file ({e})") from None
    if len(rows) < 2 or tuple(h.strip() for h in rows[0]) != PROPERTY_NAMES:
        raise PublishedNetRefused("meta.csv does not have the 13 NWS columns and one row")
    try:
        return NetConfig.from_mapping(dict(zip(PROPERTY_NAMES, rows[1], strict=True)))
    except (ParameterError, ValueError) as e:
        raise PublishedNetRefused(f"meta.csv: {e}") from None


def _read_doubles(path: Path, what: str) -> np.ndarray:
    try:
        return np.fromfile(path, dtype="<f8")
    except (OSError, ValueError):
        raise PublishedNetRefused(f"{what} missing or unreadable") from None


def read_net(directory: Path, row: Mapping[str, Any], prints: int = PUBLISHED_PRINTS) -> PublishedNet:
    """Read and check one net; raise PublishedNetRefused with the reason otherwise."""
    config = _read_meta(directory)
    try:
        listed = NetConfig.from_mapping({name: row[name] for name in PROPERTY_NAMES})
    except (ParameterError, ValueError) as e:
        raise PublishedNetRefused(f"index row: {e}") from None
    if listed != config:
        different = [n for n in PROPERTY_NAMES if getattr(listed, n) != getattr(config, n)]
        raise PublishedNetRefused(f"meta.csv and the index CSV disagree on {', '.join(different)}")
    layout = weight_layout(config)
    try:
        conv, fc = int(row["weightn_conv"]), int(row["weightn_fc"])
    except (TypeError, ValueError):
        sizes = f"{row['weightn_conv']!r}/{row['weightn_fc']!r}"
        raise PublishedNetRefused(
            f"index row: weightn_conv/weightn_fc {sizes} are not whole numbers"
        ) from None
    if (conv, fc) != (layout.weightn_conv, layout.weightn_fc):
        raise PublishedNetRefused(
            f"weightn_conv/weightn_fc {conv}/{fc} do not match the architecture "
            f"({layout.weightn_conv}/{layout.weightn_fc})"
        )
    digest = xxhash.xxh3_128((directory / "meta.csv").read_bytes())  # a change check, 10x sha256
    weights = np.empty((prints, conv + fc), dtype=np.float32)
    for k in range(1, prints + 1):
        name = snapshot_file(k)
        path = directory / name
        if not path.is_file():
            raise PublishedNetRefused(f"{name} is missing")
        raw = path.read_bytes()
        values = np.frombuffer(raw, dtype="<f8")
        if len(raw) % 8 or len(values) != conv + fc:
            raise PublishedNetRefused(
                f"{name} holds {len(raw) / 8:g} values, not weightn_conv + weightn_fc = {conv + fc}"
            )
        if not np.isfinite(values).all():
            raise PublishedNetRefused(f"{name} holds NaN or infinite weights")
        weights[k - 1] = values
        digest.update(raw)
    errors = _read_doubles(directory / "error.bin", "error.bin")
    stat = _read_doubles(directory / "stat.bin", "stat.bin")
    if len(stat) < 4 or len(errors) == 0 or len(errors) % 5:
        raise PublishedNetRefused("error.bin or stat.bin is not in the published format")
    errors = errors.reshape(-1, 5)
    n_evals = int(stat[0])
    if not 1 <= n_evals <= len(errors):
        raise PublishedNetRefused(f"stat.bin says {n_evals} evaluations, error.bin holds {len(errors)}")
    digest.update(errors.tobytes())
    digest.update(stat.tobytes())
    return PublishedNet(config, weights, errors[:n_evals], stat[:4], conv, digest.hexdigest())


def snapshot_file(k: int) -> str:
    """Snapshot k's file in a net's directory (k from 1)."""
    return f"weights/{k:03d}.bin"


def net_files(directory: Path, prints: int = PUBLISHED_PRINTS) -> list[Path]:
    """A published net's files, in the order `read_net` reads them."""
    weights = [directory / snapshot_file(k) for k in range(1, prints + 1)]
    return [directory / "meta.csv", *weights, directory / "error.bin", directory / "stat.bin"]


def prefetch(directory: Path, prints: int = PUBLISHED_PRINTS) -> None:
    """Start the kernel reading a net's files now (posix_fadvise WILLNEED), so that the worker
    that reads it soon finds them in the page cache: the disk reads of the nets queued next
    overlap the bookkeeping of the ones being written. Best effort; a no-op where unsupported."""
    if not hasattr(os, "posix_fadvise"):
        return
    for path in net_files(directory, prints):
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue  # read_net gives the reason
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)


def history_from_errors(errors: np.ndarray) -> list[dict[str, float]]:
    """Per evaluation: our history rows (accuracy from error %); evaluation i is epoch i."""
    return [
        {
            "epoch": i,
            "step": float(row[0]),
            "train_accuracy": 1.0 - row[1] / 100.0,
            "valid_accuracy": 1.0 - row[2] / 100.0,
            "test_accuracy": 1.0 - row[3] / 100.0,
            "valid_accuracy_smoothed": 1.0 - row[4] / 100.0,
        }
        for i, row in enumerate(errors)
    ]


def errors_from_history(history: pd.DataFrame, steps_per_epoch: int) -> np.ndarray:
    """error.bin rows from our history (step = epoch x steps per epoch unless recorded)."""
    steps = history["step"] if "step" in history else history["epoch"] * steps_per_epoch
    return np.column_stack(
        [
            steps,
            100.0 * (1.0 - history["train_accuracy"]),
            100.0 * (1.0 - history["valid_accuracy"]),
            100.0 * (1.0 - history["test_accuracy"]),
            100.0 * (1.0 - history["valid_accuracy_smoothed"]),
        ]
    ).astype("<f8")


def write_net(
    directory: Path, config: NetConfig, weights: np.ndarray, errors: np.ndarray, stat: np.ndarray
) -> None:
    """One net in the published layout (weights as float64)."""
    (directory / "weights").mkdir(parents=True, exist_ok=True)
    codes = config.nws_codes()
    with open(directory / "meta.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(PROPERTY_NAMES)
        writer.writerow([repr(codes[n]) if n == "lrate" else codes[n] for n in PROPERTY_NAMES])
    for k, row in enumerate(weights, start=1):
        np.asarray(row, dtype="<f8").tofile(directory / snapshot_file(k))
    np.asarray(errors, dtype="<f8").tofile(directory / "error.bin")
    np.asarray(stat, dtype="<f8").tofile(directory / "stat.bin")


def index_row(config: NetConfig, weightn_conv: int, weightn_fc: int, path: str) -> dict[str, Any]:
    return {**config.nws_codes(), "weightn_conv": weightn_conv, "weightn_fc": weightn_fc, "path": path}


def relative_path(path: Path, root: Path) -> str:
    return os.path.relpath(path, root)
