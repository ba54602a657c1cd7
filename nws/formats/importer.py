"""The engine of `import_nws`: every net of the published dataset's index CSVs becomes an MLflow
run exactly like a sampled one (same params, tags, per-epoch metrics and snapshot artifacts), so
`train` and `predict` work on published data unchanged.

It streams (a few nets in memory at a time), runs in parallel worker processes (MLflow's
bookkeeping per run is Python work, so threads would share one core), reads the next nets' files
ahead, shows progress and resumes: a net already imported (same source path and content
checksum) is skipped, and an interrupted one is imported again. A net that fails a check is
refused with its reason; the others go on. The `import_nws` command (`nws.commands.import_nws`)
checks its parameters and lists the nets (`ImportJob`).

Why one module: the net writer that runs in each worker process (`_Importer`) and the parent
that feeds the workers (read-ahead, bounded submission, the pool whose processes preload this
module) share the job types and are changed together; split, each half would be read only
against the other.
"""

from __future__ import annotations

import collections
import functools
import os
import signal
from collections.abc import Iterator, Mapping
from concurrent.futures import (
    FIRST_COMPLETED,
    Executor,
    Future,
    ProcessPoolExecutor,
    ThreadPoolExecutor,
    wait,
)
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from nws.errors import NWSError
from nws.formats import nws as nws_format
from nws.net.snapshots import published_error_rows
from nws.tracking import artifacts
from nws.tracking.datasets import foreign_dataset, log_input
from nws.tracking.runs import end_failed_run, error_text, parent_run
from nws.tracking.sql import RunNotActive
from nws.tracking.tags import (
    IMPORT_SOURCE,
    SNAPSHOTS_COMPLETE,
    TAG_ROLE,
    TAG_SNAPSHOTS,
    TAG_SOURCE,
    TAG_SOURCE_CHECKSUM,
    TAG_SOURCE_CSV,
    TAG_SOURCE_PATH,
    TAG_SPLIT,
    net_tags,
    tag_equals,
)


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


def imported_runs(experiment_id: str, source: str = IMPORT_SOURCE) -> dict[str, list[EarlierRun]]:
    """Earlier imports of one kind (`source`: the nws.source tag) in this experiment, by source path."""
    import mlflow

    runs = mlflow.search_runs(
        experiment_ids=[experiment_id],
        filter_string=tag_equals(TAG_SOURCE, source),
        output_format="list",
    )
    found: dict[str, list[EarlierRun]] = {}
    for run in runs:
        tags = run.data.tags
        found.setdefault(tags.get(TAG_SOURCE_PATH, ""), []).append(
            EarlierRun(
                run.info.run_id,
                run.info.status,
                tags.get(TAG_SNAPSHOTS) == SNAPSHOTS_COMPLETE,
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
        except nws_format.PublishedNetRefused as reason:
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
                end_failed_run(self.client, run.run_id, "FAILED", f"interrupted; imported again as {run_id}")
        return "imported", run_id

    def _write(self, job: ImportJob, directory: Path, net: nws_format.PublishedNet) -> str:
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        from nws.net.snapshots import layout_document, weight_layout

        layout = weight_layout(net.config)
        source = nws_format.relative_path(directory, job.root.resolve())
        tags = {
            MLFLOW_PARENT_RUN_ID: self.target.parent_id,
            **net_tags(job.subset, job.campaign),
            TAG_SOURCE: IMPORT_SOURCE,
            TAG_SOURCE_PATH: str(directory),
            TAG_SOURCE_CHECKSUM: net.checksum,
            TAG_SOURCE_CSV: job.csv.name,
        }
        if job.split:
            tags[TAG_SPLIT] = job.split
        run_id, artifact_uri = artifacts.create_net_run(
            self.client,
            self.target.tracking_uri,
            self.target.experiment_id,
            f"nws-{job.subset}-{source}",
            tags,
        )
        try:
            origin = f"the published NWS dataset ({job.csv.name})"
            trained_on = foreign_dataset(net.config.dataset, origin)
            log_input(trained_on, {TAG_SOURCE_CSV: job.csv.name}, run_id, self.client)
            history = nws_format.history_from_errors(net.errors)
            rows = published_error_rows(len(history), self.target.prints)
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
            end_failed_run(self.client, run_id, "FAILED", error_text(error))
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
        context.set_forkserver_preload(
            ["mlflow", "mlflow.store.tracking.sqlalchemy_store", "nws.formats.importer"]
        )
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
        except nws_format.PublishedNetRefused as reason:
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


def import_nets(
    jobs: list[ImportJob], prints: int, workers: int, params: Mapping[str, Any], experiment: str = ""
) -> ImportSummary:
    """Import the nets of `jobs` (`prints` snapshots each) with `workers` worker processes, under
    an import run that records `params` (the command's parameters as given) and ends with the
    counts and `refusals.csv`; `experiment`: the option naming the experiment of the runs."""
    import mlflow

    pool = _worker_pool(workers)
    try:
        with parent_run({TAG_ROLE: "import"}, params, run_name="import-nws", experiment=experiment) as parent:
            target = ImportTarget(
                mlflow.get_tracking_uri(), parent.info.experiment_id, parent.info.run_id, prints
            )
            try:
                summary = _import_all(pool, target, jobs, 2 * workers)
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
    tasks = _read_ahead(_tasks(jobs, imported_runs(target.experiment_id)), target.prints, in_flight)
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
