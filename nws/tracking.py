"""Everything that talks to MLflow about nets: the run of one net (params, tags, per-epoch
metrics, snapshot artifacts, training curve) and the campaign run above it.

A net run is FINISHED only after its artifacts are uploaded and tagged complete
(`nws.snapshots = complete`), so a query for complete nets never sees a half-written one.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

# Tags a query can select on.
TAG_ROLE = "nws.role"  # "net" or "campaign"
TAG_SUBSET = "nws.subset"
TAG_CAMPAIGN = "nws.campaign"
TAG_STUDY = "optuna.study"
TAG_TRIAL = "optuna.trial_number"
TAG_SEED = "nws.seed"
TAG_SNAPSHOTS = "nws.snapshots"  # "complete" once the artifacts are all there
TAG_WEIGHTS_SHA256 = "nws.weights_sha256"
TAG_WEIGHTS_SHAPE = "nws.weights_shape"
TAG_FAILURE = "nws.failure"
TAG_STOP_REASON = "nws.stop_reason"
TAG_SPLIT = "nws.split"  # "train" or "test" when a net comes with a published split
SNAPSHOTS_COMPLETE = "complete"

WEIGHTS_ARTIFACT = "snapshots/weights.npy"
LAYOUT_ARTIFACT = "snapshots/layout.json"
HISTORY_ARTIFACT = "history.csv"
CURVE_ARTIFACT = "training_curve.png"

EPOCH_METRICS = (
    "train_accuracy",
    "valid_accuracy",
    "test_accuracy",
    "loss",
    "valid_loss",
    "test_loss",
    "valid_accuracy_smoothed",
)


def _mlflow() -> Any:
    import mlflow

    return mlflow


def start_campaign_run(tags: Mapping[str, str], params: Mapping[str, Any]) -> Any:
    """Start (or, inside `mlflow run`, continue) the campaign's run.

    Params that the project run already holds (MLproject parameters) are not logged again.
    """
    mlflow = _mlflow()
    run = mlflow.active_run() or mlflow.start_run()
    mlflow.set_tags(dict(tags))
    existing = mlflow.get_run(run.info.run_id).data.params
    mlflow.log_params({k: v for k, v in params.items() if k not in existing})
    return run


def start_net_run(run_name: str, tags: Mapping[str, str], params: Mapping[str, Any]) -> Any:
    """A run for one net, nested under the active campaign run."""
    mlflow = _mlflow()
    run = mlflow.start_run(run_name=run_name, nested=True, tags=dict(tags))
    mlflow.log_params(dict(params))
    return run


def log_epoch(epoch: int, metrics: Mapping[str, float]) -> None:
    """Per-epoch metrics (step = epoch), one batch per epoch.

    Synchronous on purpose: a batch costs milliseconds, while MLflow's asynchronous queue costs
    up to a second per flush (it polls with a one-second timeout), which small nets feel.
    """
    values = {k: float(metrics[k]) for k in EPOCH_METRICS if k in metrics}
    _mlflow().log_metrics({k: v for k, v in values.items() if math.isfinite(v)}, step=epoch)


def weights_digest(weights: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(weights).tobytes()).hexdigest()


def log_net_result(
    weights: np.ndarray,
    layout: Mapping[str, Any],
    history: list[dict[str, float]],
    final_metrics: Mapping[str, float],
    tags: Mapping[str, str],
) -> None:
    """Upload a finished net's artifacts, then its final metrics, then mark it complete."""
    import pandas as pd

    mlflow = _mlflow()
    with tempfile.TemporaryDirectory(prefix="nws-artifacts-") as tmp:
        root = Path(tmp)
        (root / "snapshots").mkdir()
        np.save(root / WEIGHTS_ARTIFACT, weights.astype(np.float32, copy=False))
        (root / LAYOUT_ARTIFACT).write_text(json.dumps(layout, indent=1))
        frame = pd.DataFrame(history)
        frame.to_csv(root / HISTORY_ARTIFACT, index=False)
        (root / CURVE_ARTIFACT).write_bytes(training_curve_png(frame))
        mlflow.log_artifacts(str(root))
    mlflow.log_metrics(dict(final_metrics))
    mlflow.set_tags(
        {
            **tags,
            TAG_WEIGHTS_SHA256: weights_digest(weights),
            TAG_WEIGHTS_SHAPE: "x".join(str(n) for n in weights.shape),
            TAG_SNAPSHOTS: SNAPSHOTS_COMPLETE,
        }
    )


def training_curve_png(history: Any) -> bytes:
    """Accuracy and loss per epoch, as the original's error plot (in accuracy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc, loss) = plt.subplots(1, 2, figsize=(11, 4))
    for column, style in (
        ("train_accuracy", "r--"),
        ("valid_accuracy", "r-"),
        ("test_accuracy", "g-"),
        ("valid_accuracy_smoothed", "b-"),
    ):
        acc.plot(history["epoch"], history[column], style, label=column)
    for column, style in (("loss", "r--"), ("valid_loss", "r-"), ("test_loss", "g-")):
        loss.plot(history["epoch"], history[column], style, label=column)
    for ax, label in ((acc, "accuracy"), (loss, "loss")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(True)
        ax.legend(fontsize="small")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    return buffer.getvalue()


def end_run(status: str = "FINISHED", tags: Mapping[str, str] | None = None) -> None:
    mlflow = _mlflow()
    if tags:
        mlflow.set_tags(dict(tags))
    mlflow.end_run(status=status)
