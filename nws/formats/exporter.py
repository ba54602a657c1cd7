"""The engine of `export_nws`: selected net runs written in the published NWS layout (per-net
directories and index CSVs, `nws.formats.nws`) or, for a selection of one architecture, in the
Small CNN Zoo layout (`nws.formats.small_cnn_zoo`). The snapshots come from the zoo (verified
against their digests); every path a run's tag or id helps to build is checked to stay inside
the output directory before anything is written. The `export_nws` command
(`nws.commands.export_nws`) checks its parameters and selects the nets.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from nws.errors import DataError
from nws.formats import nws as nws_format
from nws.space import PROPERTY_NAMES, SUBSETS, NetConfig
from nws.tracking.tags import HISTORY_ARTIFACT, LAYOUT_ARTIFACT, TAG_SUBSET
from nws.zoo.cache import PLAIN_RUN_ID, ArtifactCache
from nws.zoo.store import Zoo, build_zoo

LAYOUTS = ("nws", "cnn_zoo")


def export_nets(
    nets: pd.DataFrame,
    out: Path,
    layout: str,
    cache: ArtifactCache,
    test_fraction: float = 0.2,
    seed: int = 0,
    absolute_paths: bool = False,
    kernels_only: bool = False,
) -> None:
    """Write the selected `nets` (`nws.zoo.query.query_nets`) into `out` in `layout` (one of
    LAYOUTS). A net without a published split goes to the test CSV with `test_fraction` (seeded
    by `seed`); `absolute_paths` writes absolute paths into the index CSVs; `kernels_only`
    leaves the batch-norm variables out of a cnn_zoo export."""
    for run_id in nets["run_id"]:  # run ids name the download directories of either layout
        _plain_run_id(run_id)
    directories = export_directories(nets, out) if layout == "nws" else []
    zoo = build_zoo(nets, cache)
    nets = zoo.nets.assign(artifact_uri=nets["artifact_uri"].to_numpy())
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="nws-export-") as tmp:
        if layout == "nws":
            _write_nws(nets, zoo, out.resolve(), directories, Path(tmp), test_fraction, seed, absolute_paths)
        else:
            _write_cnn_zoo(nets, zoo, out, Path(tmp), kernels_only)


def _plain_run_id(run_id: str) -> str:
    if not PLAIN_RUN_ID.fullmatch(str(run_id)):
        raise DataError(f"run {run_id!r}: not a plain MLflow run id; nothing was exported")
    return run_id


def export_directories(nets: pd.DataFrame, out: Path) -> list[Path]:
    """Each net's directory in the published layout, `out/<subset>/<run id>`, checked before
    anything is written: the subset comes from a run's tag and must be one of the subsets, the
    run id must be a plain id, and the path must resolve inside `out`; so no tag or id can lead
    the export elsewhere."""
    directories = []
    for run_id, tag in zip(nets["run_id"], nets["subset"], strict=True):
        _plain_run_id(run_id)
        subset = tag or "main"
        if subset not in SUBSETS:
            raise DataError(
                f"run {run_id}: its {TAG_SUBSET} tag {subset!r} is not one of {', '.join(SUBSETS)}; "
                "nothing was exported"
            )
        try:
            directories.append(nws_format.resolve_inside(out, f"{subset}/{run_id}"))
        except nws_format.PublishedNetRefused as reason:
            raise DataError(f"run {run_id}: {reason}; nothing was exported") from None
    return directories


def _artifact(nets: pd.DataFrame, i: int, name: str, tmp: Path) -> Path:
    import mlflow

    return Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{nets['artifact_uri'][i]}/{name}",
                                                    dst_path=str(tmp / nets["run_id"][i])))  # fmt: skip


def _splits(nets: pd.DataFrame, test_fraction: float, seed: int) -> np.ndarray:
    """Each net's published split if it has one, else a seeded draw by net."""
    parts = nets["split"].fillna("").astype(str).to_numpy().copy()
    missing = np.flatnonzero(~np.isin(parts, ["train", "test"]))
    order = np.random.default_rng(seed).permutation(missing)
    n_test = round(len(missing) * test_fraction)
    parts[order[:n_test]], parts[order[n_test:]] = "test", "train"
    return parts


def _net_weights(zoo: Zoo, i: int) -> np.ndarray:
    prints = int(zoo.nets["prints"][i])
    return np.stack([zoo.snapshot(i, k) for k in range(1, prints + 1)])


def _write_nws(
    nets: pd.DataFrame,
    zoo: Zoo,
    out: Path,
    directories: list[Path],
    tmp: Path,
    test_fraction: float,
    seed: int,
    absolute_paths: bool,
) -> None:
    """The published layout into `out` (resolved), each net into its checked directory."""
    import mlflow

    parts = _splits(nets, test_fraction, seed)
    index: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for i, net in enumerate(nets.itertuples()):
        config = NetConfig.from_mapping({name: getattr(net, name) for name in PROPERTY_NAMES})
        history = pd.read_csv(_artifact(nets, i, HISTORY_ARTIFACT, tmp))
        metrics = mlflow.get_run(net.run_id).data.metrics
        errors = nws_format.errors_from_history(history, int(metrics.get("steps_per_epoch", 1)))
        stat = np.array([len(errors), errors[-1, 0], float(history["epoch"].iloc[-1]),
                         float(metrics.get("train_seconds", 0.0))])  # fmt: skip
        subset, directory = net.subset or "main", directories[i]
        nws_format.write_net(directory, config, _net_weights(zoo, i), errors, stat)
        path = str(directory) if absolute_paths else nws_format.relative_path(directory, out)
        row = nws_format.index_row(config, int(net.weightn_conv), int(net.weightn_fc), path)
        index.setdefault((subset, parts[i]), []).append({**row, "run_id": net.run_id,
                                                          "test_accuracy": net.test_accuracy})  # fmt: skip
    for (subset, part), rows in sorted(index.items()):
        pd.DataFrame(rows).to_csv(out / f"nws_{subset}_{part}.csv", index=False)


def _write_cnn_zoo(nets: pd.DataFrame, zoo: Zoo, out: Path, tmp: Path, kernels_only: bool) -> None:
    import json

    from nws.formats import small_cnn_zoo
    from nws.net.snapshots import WeightLayout

    first = json.loads(_artifact(nets, 0, LAYOUT_ARTIFACT, tmp).read_text())
    layout = WeightLayout.from_records(first["tensors"])

    def per_net() -> Iterator[tuple[np.ndarray, pd.DataFrame]]:
        for i, net in enumerate(nets.itertuples()):
            doc = json.loads(_artifact(nets, i, LAYOUT_ARTIFACT, tmp).read_text())
            snapshots = pd.DataFrame(doc["snapshots"])
            metrics = pd.DataFrame({
                "modelindex": i, "run_id": net.run_id, "snapshot": snapshots["snapshot"],
                "step": snapshots["epoch"],
                "train_accuracy": snapshots["train_accuracy"], "test_accuracy": snapshots["test_accuracy"],
                "train_loss": snapshots.get("loss", np.nan), "test_loss": snapshots.get("test_loss", np.nan),
                **{small_cnn_zoo.config_column(name): getattr(net, name) for name in PROPERTY_NAMES},
            })  # fmt: skip
            yield _net_weights(zoo, i), metrics

    small_cnn_zoo.write(out, layout, per_net(), int(nets["prints"].sum()), kernels_only)
