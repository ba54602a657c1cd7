"""NWS interoperability: the `import_nws` and `export_nws` entry points.

Import turns every net of the published dataset's index CSVs into an MLflow run exactly like a
sampled one (same params, tags, per-epoch metrics and snapshot artifacts), so `train` and
`predict` work on published data unchanged. It streams (a few nets in memory at a time), runs in
parallel worker processes (MLflow's bookkeeping per run is Python work, so threads would share
one core), shows progress and resumes: a net already imported (same source path and content
checksum) is skipped, and an interrupted one is imported again. A net that fails a check is
refused with its reason; the others go on.

Export writes selected runs in the published layout (per-net directories and index CSVs), or a
single-architecture selection in the Small CNN Zoo layout.
"""

from __future__ import annotations

import collections
import functools
import os
import re
import signal
import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import (
    FIRST_COMPLETED,
    Executor,
    Future,
    ProcessPoolExecutor,
    ThreadPoolExecutor,
    wait,
)
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from nws import nws_format
from nws.checks import at_least, writable_directory
from nws.commands.options import param
from nws.errors import DataError, NWSError, ParameterError
from nws.space import PROPERTY_NAMES, SUBSETS, NetConfig
from nws.tracking import artifacts, runs
from nws.tracking import tags as tracking
from nws.tracking.sql import RunNotActive
from nws.zoo import Selection, default_cache_dir

TAG_SOURCE = "nws.source"  # "nws-import" on imported nets
TAG_SOURCE_PATH = "nws.source_path"
TAG_SOURCE_CHECKSUM = "nws.source_checksum"  # xxh3-128 of the net's published files
TAG_SOURCE_CSV = "nws.source_csv"
IMPORT_SOURCE = "nws-import"
FORMATS = ("nws", "cnn_zoo")
PLAIN_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,255}")
"""What a run id may look like before it becomes a file name (MLflow's are 32 hex digits)."""


@dataclass(frozen=True)
class ImportOptions:
    """The parameters of the `import_nws` entry point."""

    csv: str = param("", "index CSVs of the published data, comma list (e.g. nws_fixed_train.csv)")
    root: str = param("", "directory the CSVs' path column is relative to (default: each CSV's)")
    subset: str = param("", "fixed or main (default: from the CSV name, else main)")
    campaign: str = param("", "the nws.campaign tag of the imported nets (default: nws-<subset>)")
    prints: int = param(nws_format.PUBLISHED_PRINTS, "snapshots per net (weights/001.bin ...)")
    workers: int = param(2, "worker processes importing nets in parallel (1: in this process)")
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


@dataclass(frozen=True)
class EarlierRun:
    """What resuming needs to know of an earlier import of the same source directory."""

    run_id: str
    status: str
    complete: bool
    checksum: str


@dataclass(frozen=True)
class NetTask:
    """One net for a worker: the row, its checked directory and its earlier imports."""

    job: ImportJob
    directory: Path
    earlier: tuple[EarlierRun, ...]


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


def _imported(experiment_id: str) -> dict[str, list[EarlierRun]]:
    """Earlier imports in this experiment, by source path."""
    import mlflow

    runs = mlflow.search_runs(
        experiment_ids=[experiment_id],
        filter_string=f"tags.`{TAG_SOURCE}` = '{IMPORT_SOURCE}'",
        output_format="list",
    )
    found: dict[str, list[EarlierRun]] = {}
    for run in runs:
        tags = run.data.tags
        found.setdefault(tags.get(TAG_SOURCE_PATH, ""), []).append(
            EarlierRun(
                run.info.run_id,
                run.info.status,
                tags.get(tracking.TAG_SNAPSHOTS) == tracking.SNAPSHOTS_COMPLETE,
                tags.get(TAG_SOURCE_CHECKSUM, ""),
            )
        )
    return found


@dataclass(frozen=True)
class ImportTarget:
    """Where the nets go: all a worker process needs besides the net itself."""

    tracking_uri: str
    experiment_id: str
    parent_id: str
    prints: int


class _Importer:
    """Imports one net at a time, through MLflow's client API (one per worker)."""

    def __init__(self, target: ImportTarget):
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=target.tracking_uri)
        self.target = target

    def run(self, task: NetTask) -> tuple[str, str]:
        """("imported" | "skipped", run id) or ("refused", reason)."""
        try:
            net = nws_format.read_net(task.directory, task.job.row, self.target.prints)
        except nws_format.Refused as reason:
            return "refused", str(reason)
        for run in task.earlier:
            if run.status == "FINISHED" and run.complete and run.checksum == net.checksum:
                return "skipped", run.run_id
        try:
            run_id = self._write(task.job, task.directory, net)
        except RunNotActive as error:  # another import took this net over
            return "refused", f"{error}: ended by another import of the same data"
        for run in task.earlier:  # an interrupted earlier attempt: mark it as replaced
            if run.status == "RUNNING":
                runs.end_failed_run(
                    self.client, run.run_id, "FAILED", f"interrupted; imported again as {run_id}"
                )
        return "imported", run_id

    def _write(self, job: ImportJob, directory: Path, net: nws_format.PublishedNet) -> str:
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        from nws.snapshots import layout_document, weight_layout

        layout = weight_layout(net.config)
        source = nws_format.relative_path(directory, job.root.resolve())
        tags = {
            MLFLOW_PARENT_RUN_ID: self.target.parent_id,
            tracking.TAG_ROLE: "net",
            tracking.TAG_SUBSET: job.subset,
            tracking.TAG_CAMPAIGN: job.campaign,
            TAG_SOURCE: IMPORT_SOURCE,
            TAG_SOURCE_PATH: str(directory),
            TAG_SOURCE_CHECKSUM: net.checksum,
            TAG_SOURCE_CSV: job.csv.name,
        }
        if job.split:
            tags[tracking.TAG_SPLIT] = job.split
        run_id, artifact_uri = artifacts.create_net_run(
            self.client,
            self.target.tracking_uri,
            self.target.experiment_id,
            f"nws-{job.subset}-{source}",
            tags,
        )
        try:
            history = nws_format.history_from_errors(net.errors)
            rows = nws_format.snapshot_rows(len(history), self.target.prints)
            snapshots = [{"snapshot": k + 1, **history[i]} for k, i in enumerate(rows)]
            final = {
                "epochs": len(history) - 1,
                "train_seconds": float(net.stat[3]),
                "steps": float(net.stat[1]),
                "weightn_conv": layout.weightn_conv,
                "weightn_fc": layout.weightn_fc,
            }
            params = {**net.config.as_params(), "prints": self.target.prints, "source": source}
            document = layout_document(net.config, layout, snapshots)
            artifacts.upload_net_artifacts(
                self.client, run_id, artifact_uri, net.weights, document, history, False
            )
            entities = artifacts.net_result_entities(net.weights, history, final, {}, params, True)
            artifacts.finish_net_run(self.client, self.target.tracking_uri, run_id, entities)
        except BaseException as error:
            runs.end_failed_run(self.client, run_id, "FAILED", runs.error_text(error))
            raise
        return run_id


@functools.cache
def _importer(target: ImportTarget) -> _Importer:
    """A worker's importer (its MLflow client), made on its first net."""
    return _Importer(target)


def _import_net(target: ImportTarget, task: NetTask) -> tuple[str, str]:
    return _importer(target).run(task)


def _start_worker() -> None:
    """A worker process leaves Ctrl-C to the parent (which stops handing out nets while each
    worker finishes the one it is writing), and ends the moment the parent dies, even by
    SIGKILL: no orphan finishes a net after its import was killed; that net's run stays RUNNING
    and a resumed import replaces it."""
    import multiprocessing
    import threading

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_exit_with, args=(parent,), name="nws-exit-with-parent", daemon=True).start()


def _exit_with(parent: Any) -> None:
    from multiprocessing.connection import wait as wait_for

    wait_for([parent.sentinel])  # ready when the parent's end of the pipe closes: it is gone
    os._exit(1)


def _worker_pool(workers: int) -> Executor:
    """One worker: a thread of this process (nothing to start). More: worker processes, since
    MLflow's bookkeeping of a run is Python work that threads would run on one core. They fork
    from a server that imports MLflow once, and it starts now, while this process queries MLflow.
    """
    import multiprocessing
    import multiprocessing.forkserver

    if workers == 1:
        return ThreadPoolExecutor(max_workers=1)
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["mlflow", "mlflow.store.tracking.sqlalchemy_store", "nws.interop"])
        multiprocessing.forkserver.ensure_running()
    else:  # plain fork would share this process's MLflow database connections
        context = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_start_worker)


def _tasks(
    jobs: list[ImportJob], earlier: dict[str, list[EarlierRun]]
) -> Iterator[tuple[ImportJob, NetTask | tuple[str, str]]]:
    """Each job with its task, or with its outcome when it is refused or skipped before any
    reading."""
    seen: set[Path] = set()
    for job in jobs:
        try:
            directory = nws_format.net_directory(job.root, str(job.row["path"]))
        except nws_format.Refused as reason:
            yield job, ("refused", str(reason))
            continue
        if directory in seen:
            yield job, ("skipped", "listed twice")
            continue
        seen.add(directory)
        yield job, NetTask(job, directory, tuple(earlier.get(str(directory), ())))


def _read_ahead(tasks: Iterator[Any], prints: int, depth: int) -> Iterator[Any]:
    """The tasks, with the files of the next `depth` nets already loading (`prefetch`): the disk
    reads the nets queued next while the workers write the ones in flight (a third faster from a
    cold disk; deeper read-ahead measured no faster)."""
    ahead: collections.deque[Any] = collections.deque()
    for item in tasks:
        if isinstance(item[1], NetTask):
            nws_format.prefetch(item[1].directory, prints)
        ahead.append(item)
        if len(ahead) > depth:
            yield ahead.popleft()
    yield from ahead


def _bounded(
    pool: Executor, work: Any, tasks: Iterator[tuple[ImportJob, NetTask | tuple[str, str]]], limit: int
) -> Iterator[tuple[ImportJob, tuple[str, str]]]:
    """Each job's outcome, submitting nets as earlier ones finish, so only `limit` are ever in
    flight (in memory)."""
    pending: dict[Future, ImportJob] = {}

    def finished(futures: Any) -> Iterator[tuple[ImportJob, tuple[str, str]]]:
        for future in futures:
            yield pending.pop(future), future.result()

    for job, task in tasks:
        if not isinstance(task, NetTask):  # already decided
            yield job, task
            continue
        pending[pool.submit(work, task)] = job
        if len(pending) >= limit:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            yield from finished(done)
    while pending:
        done, _ = wait(pending, return_when=FIRST_COMPLETED)
        yield from finished(done)


def run_import(options: ImportOptions) -> ImportSummary:
    import mlflow

    jobs = list(_jobs(options))
    pool = _worker_pool(options.workers)
    try:
        with runs.parent_run({tracking.TAG_ROLE: "import"}, asdict(options), run_name="import-nws") as parent:
            target = ImportTarget(mlflow.get_tracking_uri(), parent.info.experiment_id, parent.info.run_id,
                                  options.prints)  # fmt: skip
            try:
                summary = _import_all(pool, target, jobs, 2 * options.workers)
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)  # the nets being written are finished
                raise
            mlflow.log_metrics({"imported": len(summary.imported), "skipped": len(summary.skipped),
                                "refused": len(summary.refused)})  # fmt: skip
            refusals = pd.DataFrame(summary.refused, columns=["csv", "path", "reason"])
            mlflow.log_text(refusals.to_csv(index=False), "refusals.csv")
    except BrokenProcessPool as error:
        raise NWSError(f"an import worker process died ({error}); import again to resume") from None
    finally:
        pool.shutdown()
    return summary


def _import_all(pool: Executor, target: ImportTarget, jobs: list[ImportJob], in_flight: int) -> ImportSummary:
    from nws.progress import Progress

    summary = ImportSummary(run_id=target.parent_id)
    progress = Progress(len(jobs))
    tasks = _read_ahead(_tasks(jobs, _imported(target.experiment_id)), target.prints, in_flight)
    work = functools.partial(_import_net, target)
    try:
        for index, (job, (outcome, detail)) in enumerate(_bounded(pool, work, tasks, in_flight), 1):
            where = f"{job.csv.name}: {job.row.get('path')}"
            if outcome == "refused":
                summary.refused.append(
                    {"csv": str(job.csv), "path": str(job.row.get("path")), "reason": detail}
                )
                progress.end_net(f"net {index}/{len(jobs)} refused: {where}: {detail}")
            else:
                getattr(summary, outcome).append(detail)
                progress.end_net(f"net {index}/{len(jobs)} {outcome}: {where} ({detail})")
    finally:
        progress.close()
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
        out = writable_directory("out", self.out)
        if out.exists() and any(out.iterdir()):
            raise ParameterError("out", f"{out} exists and is not empty")
        writable_directory("cache_dir", self.cache_dir or default_cache_dir())
        return out


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
                f"run {run_id}: its {tracking.TAG_SUBSET} tag {subset!r} is not one of {', '.join(SUBSETS)}; "
                "nothing was exported"
            )
        try:
            directories.append(nws_format.resolve_inside(out, f"{subset}/{run_id}"))
        except nws_format.Refused as reason:
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


def run_export(options: ExportOptions) -> Path:
    from nws.zoo import ArtifactCache, build_zoo, query_nets

    out = options.validate()
    nets = query_nets(options)
    if options.format == "cnn_zoo" and nets["n_weights"].nunique() != 1:
        raise ParameterError(
            "format", "cnn_zoo needs nets of one architecture (select e.g. the fixed subset)"
        )
    for run_id in nets["run_id"]:  # run ids name the download directories of either format
        _plain_run_id(run_id)
    directories = export_directories(nets, out) if options.format == "nws" else []
    zoo = build_zoo(nets, ArtifactCache(Path(options.cache_dir).expanduser() if options.cache_dir else None))
    nets = zoo.nets.assign(artifact_uri=nets["artifact_uri"].to_numpy())
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="nws-export-") as tmp:
        if options.format == "nws":
            _export_nws(nets, zoo, out.resolve(), directories, Path(tmp), options)
        else:
            _export_cnn_zoo(nets, zoo, out, Path(tmp))
    print(f"exported {len(nets)} nets to {out} ({options.format} layout)")
    return out


def _net_weights(zoo: Any, i: int) -> np.ndarray:
    prints = int(zoo.nets["prints"][i])
    return np.stack([zoo.snapshot(i, k) for k in range(1, prints + 1)])


def _export_nws(
    nets: pd.DataFrame, zoo: Any, out: Path, directories: list[Path], tmp: Path, options: ExportOptions
) -> None:
    """The published layout into `out` (resolved), each net into its checked directory."""
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
        subset, directory = net.subset or "main", directories[i]
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
