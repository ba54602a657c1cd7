"""NWS interoperability: the `import_nws` and `export_nws` entry points.

Import turns every net of the published dataset's index CSVs into an MLflow run exactly like a
sampled one (same params, tags, per-epoch metrics and snapshot artifacts), so `train` and
`predict` work on published data unchanged. It streams (a few nets in memory at a time), runs in
parallel, shows progress and resumes: a net already imported (same source path and content
checksum) is skipped, and an interrupted one is imported again. A net that fails a check is
refused with its reason; the others go on.

Export writes selected runs in the published layout (per-net directories and index CSVs), or a
single-architecture selection in the Small CNN Zoo layout.
"""

from __future__ import annotations

import sys
import tempfile
import threading
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from nws import nws_format, tracking
from nws.errors import ParameterError
from nws.params import at_least, param
from nws.space import PROPERTY_NAMES, NetConfig
from nws.zoo import Selection

TAG_SOURCE = "nws.source"  # "nws-import" on imported nets
TAG_SOURCE_PATH = "nws.source_path"
TAG_SOURCE_SHA256 = "nws.source_sha256"
TAG_SOURCE_CSV = "nws.source_csv"
IMPORT_SOURCE = "nws-import"
FORMATS = ("nws", "cnn_zoo")


@dataclass(frozen=True)
class ImportOptions:
    """The parameters of the `import_nws` entry point."""

    csv: str = param("", "index CSVs of the published data, comma list (e.g. nws_fixed_train.csv)")
    root: str = param("", "directory the CSVs' path column is relative to (default: each CSV's)")
    subset: str = param("", "fixed or main (default: from the CSV name, else main)")
    campaign: str = param("", "the nws.campaign tag of the imported nets (default: nws-<subset>)")
    prints: int = param(nws_format.PUBLISHED_PRINTS, "snapshots per net (weights/001.bin ...)")
    workers: int = param(2, "nets imported in parallel")
    allow_refused: bool = param(False, "exit 0 even when some nets were refused")

    def csv_paths(self) -> list[Path]:
        paths = [Path(p.strip()).expanduser() for p in self.csv.split(",") if p.strip()]
        if not paths:
            raise ParameterError("csv", "no index CSV given")
        for path in paths:
            if not path.is_file():
                raise ParameterError("csv", f"{path} does not exist")
        at_least("prints", self.prints, 1)
        at_least("workers", self.workers, 1)
        if self.subset and self.subset not in ("fixed", "main"):
            raise ParameterError("subset", f"{self.subset!r} is not one of fixed, main")
        if self.root and not Path(self.root).expanduser().is_dir():
            raise ParameterError("root", f"{self.root} is not a directory")
        return paths


@dataclass(frozen=True)
class ImportJob:
    csv: Path
    row: dict[str, Any]
    root: Path
    subset: str
    split: str
    campaign: str


@dataclass
class ImportSummary:
    imported: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    refused: list[dict[str, str]] = field(default_factory=list)
    run_id: str = ""

    def line(self) -> str:
        return (
            f"imported {len(self.imported)} nets, skipped {len(self.skipped)} already imported, "
            f"refused {len(self.refused)} (MLflow run {self.run_id})"
        )


def _jobs(options: ImportOptions) -> Iterator[ImportJob]:
    for csv in options.csv_paths():
        frame = nws_format.read_index(csv)
        root = Path(options.root).expanduser() if options.root else csv.parent
        subset = options.subset or nws_format.subset_of(csv) or "main"
        campaign = options.campaign or f"nws-{subset}"
        for row in frame.to_dict("records"):
            yield ImportJob(csv, row, root, subset, nws_format.split_of(csv), campaign)


def _imported(experiment_id: str) -> dict[str, list[Any]]:
    """Earlier imports in this experiment, by source path."""
    import mlflow

    runs = mlflow.search_runs(
        experiment_ids=[experiment_id],
        filter_string=f"tags.`{TAG_SOURCE}` = '{IMPORT_SOURCE}'",
        output_format="list",
    )
    found: dict[str, list[Any]] = {}
    for run in runs:
        found.setdefault(run.data.tags.get(TAG_SOURCE_PATH, ""), []).append(run)
    return found


class _Importer:
    """Imports one net at a time per worker thread, through the thread-safe client API."""

    def __init__(self, experiment_id: str, parent_id: str, earlier: dict[str, list[Any]], prints: int):
        from mlflow import MlflowClient

        self.client = MlflowClient()
        self.experiment_id = experiment_id
        self.parent_id = parent_id
        self.earlier = earlier
        self.prints = prints
        self.claimed: set[tuple[str, str]] = set()
        self.lock = threading.Lock()

    def run(self, job: ImportJob) -> tuple[str, str]:
        """("imported" | "skipped", run id or reason) or ("refused", reason)."""
        try:
            directory = nws_format.resolve_inside(job.root, str(job.row["path"]))
            net = nws_format.read_net(directory, job.row, self.prints)
        except nws_format.Refused as reason:
            return "refused", str(reason)
        key = (str(directory), net.checksum)
        with self.lock:
            if key in self.claimed:
                return "skipped", "listed twice"
            self.claimed.add(key)
        runs = self.earlier.get(str(directory), [])
        for run in runs:
            done = run.info.status == "FINISHED" and run.data.tags.get(tracking.TAG_SNAPSHOTS) == "complete"
            if done and run.data.tags.get(TAG_SOURCE_SHA256) == net.checksum:
                return "skipped", run.info.run_id
        run_id = self._write(job, directory, net)
        for run in runs:  # an interrupted earlier attempt: mark it as replaced
            if run.info.status == "RUNNING":
                self.client.set_tag(
                    run.info.run_id, tracking.TAG_FAILURE, f"interrupted; imported again as {run_id}"
                )
                self.client.set_terminated(run.info.run_id, "FAILED")
        return "imported", run_id

    def _write(self, job: ImportJob, directory: Path, net: nws_format.PublishedNet) -> str:
        from mlflow.entities import Param
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        from nws.snapshots import layout_document, weight_layout

        layout = weight_layout(net.config)
        source = nws_format.relative_path(directory, job.root.resolve())
        tags = {
            MLFLOW_PARENT_RUN_ID: self.parent_id,
            tracking.TAG_ROLE: "net",
            tracking.TAG_SUBSET: job.subset,
            tracking.TAG_CAMPAIGN: job.campaign,
            TAG_SOURCE: IMPORT_SOURCE,
            TAG_SOURCE_PATH: str(directory),
            TAG_SOURCE_SHA256: net.checksum,
            TAG_SOURCE_CSV: job.csv.name,
        }
        if job.split:
            tags[tracking.TAG_SPLIT] = job.split
        run = self.client.create_run(self.experiment_id, run_name=f"nws-{job.subset}-{source}", tags=tags)
        run_id = run.info.run_id
        try:
            history = nws_format.history_from_errors(net.errors)
            rows = nws_format.snapshot_rows(len(history), self.prints)
            snapshots = [{"snapshot": k + 1, **history[i]} for k, i in enumerate(rows)]
            params = {**net.config.as_params(), "prints": self.prints, "source": source}
            self.client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
            tracking.log_history(self.client, run_id, history)
            tracking.write_net_result(
                self.client,
                run_id,
                net.weights,
                layout_document(net.config, layout, snapshots),
                history,
                {
                    "epochs": len(history) - 1,
                    "train_seconds": float(net.stat[3]),
                    "steps": float(net.stat[1]),
                    "weightn_conv": layout.weightn_conv,
                    "weightn_fc": layout.weightn_fc,
                },
                {},
                curve=False,
            )
        except BaseException as error:
            self.client.set_tag(run_id, tracking.TAG_FAILURE, f"{type(error).__name__}: {error}"[:500])
            self.client.set_terminated(run_id, "FAILED")
            raise
        self.client.set_terminated(run_id, "FINISHED")
        return run_id


def _bounded(
    pool: ThreadPoolExecutor, work: Any, jobs: Iterator[ImportJob], limit: int
) -> Iterator[tuple[ImportJob, Future]]:
    """Submit jobs as earlier ones finish, so only `limit` nets are ever in memory."""
    pending: dict[Future, ImportJob] = {}
    for job in jobs:
        pending[pool.submit(work, job)] = job
        if len(pending) >= limit:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                yield pending.pop(future), future
    for future in list(pending):
        yield pending.pop(future), future


def run_import(options: ImportOptions) -> ImportSummary:
    import mlflow

    from nws.progress import Progress

    jobs = list(_jobs(options))
    owns_run = mlflow.active_run() is None
    parent = mlflow.active_run() or mlflow.start_run(run_name="import-nws")
    mlflow.set_tags({tracking.TAG_ROLE: "import"})
    existing = mlflow.get_run(parent.info.run_id).data.params
    mlflow.log_params({k: v for k, v in asdict(options).items() if k not in existing})
    importer = _Importer(parent.info.experiment_id, parent.info.run_id,
                         _imported(parent.info.experiment_id), options.prints)  # fmt: skip
    summary = ImportSummary(run_id=parent.info.run_id)
    progress = Progress(len(jobs))
    try:
        with ThreadPoolExecutor(max_workers=options.workers) as pool:
            for index, (job, future) in enumerate(
                _bounded(pool, importer.run, iter(jobs), 2 * options.workers), 1
            ):
                outcome, detail = future.result()
                where = f"{job.csv.name}: {job.row.get('path')}"
                if outcome == "refused":
                    summary.refused.append(
                        {"csv": str(job.csv), "path": str(job.row.get("path")), "reason": detail}
                    )
                    progress.end_net(f"net {index}/{len(jobs)} refused: {where}: {detail}")
                else:
                    getattr(summary, outcome).append(detail)
                    progress.end_net(f"net {index}/{len(jobs)} {outcome}: {where} ({detail})")
        mlflow.log_metrics({"imported": len(summary.imported), "skipped": len(summary.skipped),
                            "refused": len(summary.refused)})  # fmt: skip
        refusals = pd.DataFrame(summary.refused, columns=["csv", "path", "reason"])
        mlflow.log_text(refusals.to_csv(index=False), "refusals.csv")
    except BaseException as error:
        progress.close()
        if owns_run:
            mlflow.end_run("KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
        raise
    progress.close()
    if owns_run:
        mlflow.end_run()
    return summary


@dataclass(frozen=True)
class ExportOptions(Selection):
    """The parameters of the `export_nws` entry point: the selection (as `train`), then where."""

    out: str = param("nws-export", "output directory")
    format: str = param("nws", "nws (the published layout) or cnn_zoo (Small CNN Zoo, one architecture)")
    test_fraction: float = param(0.2, "share of nets written to the test CSV when a net has no nws.split tag")
    seed: int = param(0, "seed of that train/test assignment")
    absolute_paths: bool = param(False, "write absolute paths into the index CSVs")
    cache_dir: str = param("", "snapshot cache (default $NWS_CACHE_DIR or ~/.cache/nws/zoo)")

    def validate(self) -> Path:
        if self.format not in FORMATS:
            raise ParameterError("format", f"{self.format!r} is not one of {', '.join(FORMATS)}")
        if not 0.0 <= self.test_fraction < 1.0:
            raise ParameterError("test_fraction", f"{self.test_fraction} is not in [0, 1)")
        out = Path(self.out).expanduser()
        if out.exists() and any(out.iterdir()):
            raise ParameterError("out", f"{out} exists and is not empty")
        return out


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


def run_export(options: ExportOptions) -> Path:
    from nws.zoo import ArtifactCache, build_zoo, query_nets

    out = options.validate()
    nets = query_nets(options)
    if options.format == "cnn_zoo" and nets["n_weights"].nunique() != 1:
        raise ParameterError(
            "format", "cnn_zoo needs nets of one architecture (select e.g. the fixed subset)"
        )
    zoo = build_zoo(nets, ArtifactCache(Path(options.cache_dir) if options.cache_dir else None))
    nets = zoo.nets.assign(artifact_uri=nets["artifact_uri"].to_numpy())
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="nws-export-") as tmp:
        if options.format == "nws":
            _export_nws(nets, zoo, out, Path(tmp), options)
        else:
            _export_cnn_zoo(nets, zoo, out, Path(tmp))
    print(f"exported {len(nets)} nets to {out} ({options.format} layout)")
    return out


def _net_weights(zoo: Any, i: int) -> np.ndarray:
    prints = int(zoo.nets["prints"][i])
    return np.stack([zoo.snapshot(i, k) for k in range(1, prints + 1)])


def _export_nws(nets: pd.DataFrame, zoo: Any, out: Path, tmp: Path, options: ExportOptions) -> None:
    import mlflow

    parts = _splits(nets, options.test_fraction, options.seed)
    index: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for i, net in enumerate(nets.itertuples()):
        config = NetConfig.from_mapping({name: getattr(net, name) for name in PROPERTY_NAMES})
        history = pd.read_csv(_artifact(nets, i, tracking.HISTORY_ARTIFACT, tmp))
        metrics = mlflow.get_run(net.run_id).data.metrics
        errors = nws_format.errors_from_history(history, int(metrics.get("steps_per_epoch", 1)))
        stat = np.array([len(errors), errors[-1, 0], float(history["epoch"].iloc[-1]),
                         float(metrics.get("train_seconds", 0.0))])  # fmt: skip
        subset = net.subset or "main"
        directory = out / subset / net.run_id
        nws_format.write_net(directory, config, _net_weights(zoo, i), errors, stat)
        path = str(directory) if options.absolute_paths else nws_format.relative_path(directory, out)
        row = nws_format.index_row(config, int(net.weightn_conv), int(net.weightn_fc), path)
        index.setdefault((subset, parts[i]), []).append({**row, "run_id": net.run_id,
                                                          "test_accuracy": net.test_accuracy})  # fmt: skip
    for (subset, part), rows in sorted(index.items()):
        pd.DataFrame(rows).to_csv(out / f"nws_{subset}_{part}.csv", index=False)


def _export_cnn_zoo(nets: pd.DataFrame, zoo: Any, out: Path, tmp: Path) -> None:
    import json

    from nws import small_cnn_zoo
    from nws.snapshots import WeightLayout

    first = json.loads(_artifact(nets, 0, tracking.LAYOUT_ARTIFACT, tmp).read_text())
    layout = WeightLayout.from_records(first["tensors"])

    def per_net() -> Iterator[tuple[np.ndarray, pd.DataFrame]]:
        for i, net in enumerate(nets.itertuples()):
            doc = json.loads(_artifact(nets, i, tracking.LAYOUT_ARTIFACT, tmp).read_text())
            snapshots = pd.DataFrame(doc["snapshots"])
            metrics = pd.DataFrame({
                "modelindex": i, "run_id": net.run_id, "snapshot": snapshots["snapshot"],
                "step": snapshots["epoch"],
                "train_accuracy": snapshots["train_accuracy"], "test_accuracy": snapshots["test_accuracy"],
                "train_loss": snapshots.get("loss", np.nan), "test_loss": snapshots.get("test_loss", np.nan),
                **{f"config.{name}": getattr(net, name) for name in PROPERTY_NAMES},
            })  # fmt: skip
            yield _net_weights(zoo, i), metrics

    small_cnn_zoo.write(out, layout, per_net(), int(nets["prints"].sum()))


def print_refusals(summary: ImportSummary) -> None:
    for refusal in summary.refused:
        print(
            f"refused {refusal['path']} ({Path(refusal['csv']).name}): {refusal['reason']}", file=sys.stderr
        )
