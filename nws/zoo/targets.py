"""What the selected nets were at each snapshot: the per-snapshot records of their layout documents
(`snapshots/layout.json`), the values a snapshot target (`nws.space.SNAPSHOT_TARGETS`) regresses,
and the tensor layout that nets of a foreign architecture (an imported Small CNN Zoo) carry with
them instead of the 13 properties that name an NWS architecture.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from nws.errors import DataError
from nws.net.snapshots import WeightLayout
from nws.tracking.tags import LAYOUT_ARTIFACT
from nws.zoo.cache import _is_local, _local_path


def layout_documents(nets: pd.DataFrame) -> list[dict[str, Any]]:
    """Each net's `snapshots/layout.json`: read in place from a local artifact store, downloaded
    (a few kilobytes each) from any other."""
    import mlflow

    documents = []
    with tempfile.TemporaryDirectory(prefix="nws-layouts-") as tmp:
        for run_id, uri in zip(nets["run_id"], nets["artifact_uri"], strict=True):
            try:
                if _is_local(uri):
                    path = _local_path(uri) / LAYOUT_ARTIFACT
                else:
                    got = mlflow.artifacts.download_artifacts(
                        artifact_uri=f"{uri}/{LAYOUT_ARTIFACT}", dst_path=str(Path(tmp) / run_id)
                    )
                    path = Path(got)
                document = json.loads(path.read_text(encoding="utf-8"))
                if not isinstance(document.get("snapshots"), list):
                    raise ValueError("no list of snapshots")
            except Exception as e:  # any failure (a download's, a file's, JSON's) is one line naming the run
                reason = (str(getattr(e, "message", "") or e) or type(e).__name__).splitlines()[0]
                raise DataError(f"run {run_id}: cannot read its {LAYOUT_ARTIFACT} ({reason})") from None
            documents.append(document)
    return documents


def _snapshot_value(record: dict[str, Any], target: str) -> float:
    try:
        if target == "generalization_gap":
            return float(record["train_accuracy"]) - float(record["test_accuracy"])
        return float(record[target])
    except (KeyError, TypeError, ValueError):
        return float("nan")


def snapshot_values(documents: Sequence[dict[str, Any]], target: str, prints: int) -> np.ndarray:
    """[nets, prints] the target's value at each snapshot (NaN where a net's record lacks it)."""
    values = np.full((len(documents), prints), np.nan)
    for i, document in enumerate(documents):
        for record in document["snapshots"]:
            k = int(record.get("snapshot", 0))
            if 1 <= k <= prints:
                values[i, k - 1] = _snapshot_value(record, target)
    return values


def check_values(values: np.ndarray, run_ids: Sequence[str], target: str, k_range: tuple[int, int]) -> None:
    """Every net needs a finite value at every snapshot of the K range: a DataError naming the
    first net and snapshot that has none."""
    window = values[:, k_range[0] - 1 : k_range[1]]
    missing = np.argwhere(~np.isfinite(window))
    if len(missing):
        net, k = (int(x) for x in missing[0])
        raise DataError(
            f"run {run_ids[net]}: no {target} at snapshot {k + k_range[0]} in its {LAYOUT_ARTIFACT} "
            f"({len(missing)} snapshots of the K range lack one)"
        )


def foreign_layout(document: dict[str, Any]) -> WeightLayout:
    """The tensor layout a net's layout document names (every net run writes one)."""
    try:
        return WeightLayout.from_records(document["tensors"])
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{LAYOUT_ARTIFACT}: no readable tensor layout ({type(e).__name__}: {e})") from None
