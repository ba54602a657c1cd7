"""The engine of `import_cnn_zoo`: every net of a Small CNN Zoo directory
(`nws.formats.cnn_zoo_reader`) becomes an MLflow net run that `train` can use: params from the
`config.*` columns under their own names, per-checkpoint metrics at step = the checkpoint's epoch,
all its checkpoints as its snapshots (step order, our layout) and a `layout.json` naming the
tensors and their source columns.

It keeps `import_nws`'s guarantees: it streams (the weights file is memory-mapped and a net's rows
are read when its turn comes), a run is FINISHED only once its artifacts and the completion tag
are written (on a database store its rows go in one transaction), a second call skips the nets
already imported (same source and checksum) and replaces any that an interrupted call left
RUNNING, and a bad net is refused with its reason while the others go on. Nets are written one
at a time in this process: a zoo's nets are small (the published ones: 9 x 4,970 weights).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from nws.formats.cnn_zoo_reader import CnnZoo, ZooNet, ZooNetRefused, zoo_layout_document
from nws.formats.importer import EarlierRun, ImportSummary, imported_runs
from nws.tracking import artifacts
from nws.tracking.datasets import foreign_dataset, log_input
from nws.tracking.runs import end_failed_run, error_text, parent_run
from nws.tracking.sql import RunNotActive
from nws.tracking.tags import (
    TAG_ROLE,
    TAG_SOURCE,
    TAG_SOURCE_CHECKSUM,
    TAG_SOURCE_PATH,
    net_tags,
)

CNN_ZOO_SOURCE = "cnn-zoo-import"
SUBSET = "cnn_zoo"


def _write(
    client: Any, zoo: CnnZoo, net: ZooNet, source: str, campaign: str, target: Mapping[str, str]
) -> str:
    """One net's run, created RUNNING and finished only once everything is written."""
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    tags = {MLFLOW_PARENT_RUN_ID: target["parent_id"], **net_tags(SUBSET, campaign),
            TAG_SOURCE: CNN_ZOO_SOURCE, TAG_SOURCE_PATH: source,
            TAG_SOURCE_CHECKSUM: net.checksum}  # fmt: skip
    run_id, artifact_uri = artifacts.create_net_run(
        client, target["tracking_uri"], target["experiment_id"], f"cnn-zoo-{net.key}"[:250], tags
    )
    try:
        name = str(net.config.get("config.dataset") or zoo.directory.resolve().name)
        log_input(
            foreign_dataset(name, f"the Small CNN Zoo in {zoo.directory.resolve().name}"), {}, run_id, client
        )
        history = [{k: v for k, v in s.items() if k not in ("snapshot", "step")} for s in net.snapshots]
        last = net.snapshots[-1]
        final = {"epochs": last["epoch"], "weightn_conv": zoo.layout.weightn_conv,
                 "weightn_fc": zoo.layout.weightn_fc,
                 **{m: last[m] for m in ("train_accuracy", "test_accuracy") if m in last}}  # fmt: skip
        params = {**net.config, "prints": len(net.weights), "source": net.key}
        document = zoo_layout_document(net, zoo.layout, zoo.native)
        artifacts.upload_net_artifacts(client, run_id, artifact_uri, net.weights, document, history, False)
        entities = artifacts.net_result_entities(net.weights, history, final, {}, params, True)
        artifacts.finish_net_run(client, target["tracking_uri"], run_id, entities)
    except BaseException as error:
        end_failed_run(client, run_id, "FAILED", error_text(error))
        raise
    return run_id


def import_zoo(directory: Path, campaign: str, checkpoints: int, params: Mapping[str, Any]) -> ImportSummary:
    """Import every net of the zoo in `directory` under an import run that records `params`;
    `checkpoints`: the number each net must have (0: the number most nets have)."""
    import mlflow
    from mlflow import MlflowClient

    from nws import interrupts
    from nws.progress import Progress

    zoo = CnnZoo(directory)
    nets = zoo.nets()
    checkpoints = checkpoints or zoo.common_checkpoints()
    root = str(directory.resolve())
    with parent_run({TAG_ROLE: "import"}, params, run_name="import-cnn-zoo") as parent:
        target = {"tracking_uri": mlflow.get_tracking_uri(), "experiment_id": parent.info.experiment_id,
                  "parent_id": parent.info.run_id}  # fmt: skip
        client = MlflowClient(tracking_uri=target["tracking_uri"])
        earlier = imported_runs(target["experiment_id"], CNN_ZOO_SOURCE)
        summary = ImportSummary(run_id=parent.info.run_id)
        progress = Progress(len(nets))
        try:
            for index, (key, rows) in enumerate(nets.items(), start=1):
                interrupts.check()
                source = f"{root}#{key}"
                outcome, detail = _import_one(client, zoo, key, rows, checkpoints, source, campaign, target,
                                              earlier.get(source, []))  # fmt: skip
                if outcome == "refused":
                    summary.refused.append(
                        {"csv": str(directory / "metrics.csv.gz"), "path": key, "reason": detail}
                    )
                else:
                    getattr(summary, outcome).append(detail)
                progress.end_net(f"net {index}/{len(nets)} {outcome}: {key} ({detail})")
        finally:
            progress.close()
        mlflow.log_metrics({"imported": len(summary.imported), "skipped": len(summary.skipped),
                            "refused": len(summary.refused), "checkpoints": checkpoints})  # fmt: skip
        refusals = pd.DataFrame(summary.refused, columns=["csv", "path", "reason"])
        mlflow.log_text(refusals.to_csv(index=False), "refusals.csv")
    return summary


def _import_one(
    client: Any,
    zoo: CnnZoo,
    key: str,
    rows: Any,
    checkpoints: int,
    source: str,
    campaign: str,
    target: Mapping[str, str],
    earlier: list[EarlierRun],
) -> tuple[str, str]:
    """("imported" | "skipped", run id) or ("refused", reason)."""
    try:
        net = zoo.read(key, rows, checkpoints)
    except ZooNetRefused as reason:
        return "refused", str(reason)
    for run in earlier:
        if run.status == "FINISHED" and run.complete and run.checksum == net.checksum:
            return "skipped", run.run_id
    try:
        run_id = _write(client, zoo, net, source, campaign, target)
    except RunNotActive as error:
        return "refused", f"{error}: ended by another import of the same data"
    for run in earlier:  # an interrupted earlier attempt: mark it as replaced
        if run.status == "RUNNING":
            end_failed_run(client, run.run_id, "FAILED", f"interrupted; imported again as {run_id}")
    return "imported", run_id
