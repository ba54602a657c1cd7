"""Which nets form a zoo: an MLflow run query for finished net runs whose snapshots are complete,
AND-ed with the caller's filter, one row per net with what the zoo and the splits need."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd

from nws.errors import DataError
from nws.space import PROPERTY_NAMES
from nws.tracking.tags import (
    SNAPSHOTS_COMPLETE,
    TAG_CAMPAIGN,
    TAG_ROLE,
    TAG_SNAPSHOTS,
    TAG_SOURCE_PATH,
    TAG_SPLIT,
    TAG_SUBSET,
    TAG_TRIAL,
    TAG_WEIGHTS_DIGEST,
    TAG_WEIGHTS_SHAPE,
    tag_equals,
)

BUILTIN_FILTER = (
    f"{tag_equals(TAG_ROLE, 'net')} and attributes.status = 'FINISHED' "
    f"and {tag_equals(TAG_SNAPSHOTS, SNAPSHOTS_COMPLETE)}"
)
RECORD_COLUMNS = ("run_id", "experiment_id", "artifact_uri", "digest", "prints", "n_weights", "weightn_conv",
                  "weightn_fc", "test_accuracy", "subset", "campaign", "trial", "source_path", "split",
                  *PROPERTY_NAMES)  # fmt: skip


class UnknownExperiment(LookupError):
    """An experiment name that the tracking store does not know."""


def filter_string(filter: str = "", min_test_accuracy: float = 0.0) -> str:
    """The search filter of a selection: the built-in condition AND the accuracy floor AND the
    user's filter."""
    parts = [BUILTIN_FILTER]
    if min_test_accuracy > 0:
        parts.append(f"metrics.test_accuracy >= {min_test_accuracy!r}")
    if filter.strip():
        parts.append(filter.strip())
    return " and ".join(parts)


def query_nets(
    experiments: Sequence[str] | None, filter: str = "", min_test_accuracy: float = 0.0
) -> pd.DataFrame:
    """One row per selected net (run id, the 13 properties, sizes, accuracy and tags) in a stable
    order (`stable_order`); none when nothing matches. `experiments` are names (None: every
    experiment). A filter MLflow refuses raises its MlflowException."""
    import mlflow

    experiment_ids = None
    if experiments is not None:
        experiment_ids = []
        for name in experiments:
            experiment = mlflow.get_experiment_by_name(name)
            if experiment is None:
                raise UnknownExperiment(f"no MLflow experiment named {name!r}")
            experiment_ids.append(experiment.experiment_id)
    runs = mlflow.search_runs(
        experiment_ids=experiment_ids,
        search_all_experiments=experiment_ids is None,
        filter_string=filter_string(filter, min_test_accuracy),
        output_format="list",
    )
    return stable_order(pd.DataFrame([_net_record(run) for run in runs], columns=RECORD_COLUMNS))


def stable_order(nets: pd.DataFrame) -> pd.DataFrame:
    """The nets ordered by who they are, not by when they ran: campaign, then trial number (a
    sampled net) or source path (an imported one), the run id last. Start times depend on worker
    timing, and everything seeded downstream (splits, exports) follows this order, so the same
    nets give the same result however many workers trained them and however loaded the machine."""
    order = nets.sort_values(["campaign", "trial", "source_path", "run_id"], kind="stable")
    return order.reset_index(drop=True)


def _net_record(run: Any) -> dict[str, Any]:
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    try:
        prints, n_weights = (int(x) for x in tags[TAG_WEIGHTS_SHAPE].split("x"))
        record = {
            "run_id": run.info.run_id,
            "experiment_id": run.info.experiment_id,
            "artifact_uri": run.info.artifact_uri,
            "digest": tags[TAG_WEIGHTS_DIGEST],
            "prints": prints,
            "n_weights": n_weights,
            "weightn_conv": int(metrics["weightn_conv"]),
            "weightn_fc": int(metrics["weightn_fc"]),
            "test_accuracy": metrics.get("test_accuracy", float("nan")),
            "subset": tags.get(TAG_SUBSET, ""),
            "campaign": tags.get(TAG_CAMPAIGN, ""),
            "trial": int(tags.get(TAG_TRIAL, -1)),
            "source_path": tags.get(TAG_SOURCE_PATH, ""),
            "split": tags.get(TAG_SPLIT, ""),
        }
        # A net imported from a foreign zoo (import_cnn_zoo) has its own params instead of the 13.
        record.update({name: params.get(name, "") for name in PROPERTY_NAMES})
    except (KeyError, ValueError) as e:
        raise DataError(f"run {run.info.run_id}: not a complete nws net run (missing {e})") from None
    if record["weightn_conv"] + record["weightn_fc"] != n_weights:
        raise DataError(f"run {run.info.run_id}: weightn_conv + weightn_fc != {n_weights}")
    return record
