"""`import_nws` throughput against plain numpy.fromfile of the same files, and its peak memory.

Writes N nets of the fixed architecture in the published layout (20 float64 snapshots each),
then measures back to back: np.fromfile of every snapshot file, then `nws import_nws` into a
fresh store (snapshots per second; target at least 0.5x numpy), for each worker count, `--repeat`
times (median; a shared machine's disk speed drifts between minutes). Two rates per
import: end to end (Python start-up, MLflow import and queries included) and steady (from the
first net done to the last, what a 16,000-net import runs at). Both with the files in the page
cache (warm) and, where allowed, after dropping it (cold). Peak memory is the proportional set size
of the whole import (parent, fork server and workers together), sampled every 50 ms, for imports of
growing size (target: flat). Last, side by side on one store: ending a net's run the way MLflow's
client does it (`log_batch` then `set_terminated`, what an `mlflow server` gets) against the one
transaction that database stores get (`nws.tracking.sql`).

The store is SQLite (created before the clock starts, as a user's existing store), or with
--postgres a private PostgreSQL server (the Debian package's binaries, as the tests use).

Run: python benchmarks/import_speed.py [--nets 100] [--workers 1,2] [--memory-nets 25,100] [--postgres]
     [--repeat 3]
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from pagecache import drop_page_cache

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
FIXED = ["mnist", 0.0021, 64, 1, 0, 0, 0, 2, 5, 3, 2, 8, 128]
PRINTS = 20


def write_published(root: Path, nets: int) -> Path:
    from tests import published as pub

    conv, fc = pub.conv_fc_sizes(*FIXED[8:])
    rows = []
    for i in range(nets):
        pub.write_net(root / "nets" / f"n{i:05d}", FIXED, pub.published_weights(conv + fc, i), n_evals=40)
        rows.append(pub.index_row(FIXED, (conv, fc), f"nets/n{i:05d}"))
    return pub.write_index(root / "nws_fixed_train.csv", rows)


def numpy_read(root: Path) -> float:
    t = time.perf_counter()
    for path in sorted(root.glob("nets/*/weights/*.bin")):
        np.fromfile(path, dtype=np.float64)
    return time.perf_counter() - t


def tree_memory(pid: int) -> int:
    """Proportional set size (shared pages split between their users, so the fork server's pages
    count once) of pid and every process below it, in bytes (Linux /proc)."""
    from tests.processes import descendants

    total = 0
    for p in {pid} | descendants(pid):
        try:
            rollup = Path(f"/proc/{p}/smaps_rollup").read_text().splitlines()
        except OSError:
            continue
        total += next((int(line.split()[1]) * 1024 for line in rollup if line.startswith("Pss:")), 0)
    return total


class Stores:
    """Fresh tracking stores: SQLite files, or databases of one private PostgreSQL server."""

    def __init__(self, root: Path, postgres: bool):
        self.root = root
        self.server = None
        if postgres:
            from tests.conftest import Postgres

            self.server = Postgres(Path(tempfile.mkdtemp(prefix="nws-postgres-")))

    def fresh(self) -> tuple[str, Path]:
        """A new store's URI, and the directory its artifacts go to (a working directory)."""
        where = Path(tempfile.mkdtemp(prefix="store-", dir=self.root))
        uri = self.server.database() if self.server is not None else f"sqlite:///{where}/mlflow.db"
        create = "import mlflow; mlflow.MlflowClient().search_experiments()"
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
        subprocess.run([sys.executable, "-c", create], env=env, cwd=where, check=True, capture_output=True)
        return uri, where

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
            shutil.rmtree(self.server.root, ignore_errors=True)


def import_once(csv: Path, workers: int, store: tuple[str, Path]) -> dict[str, float]:
    """One `nws import_nws` process: seconds end to end, first and last net done, peak RSS."""
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "nws.cli", "import_nws", "--csv", str(csv), "--workers", str(workers)],
        env={**os.environ, "MLFLOW_TRACKING_URI": store[0]}, cwd=store[1],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    done: list[float] = []
    tail: list[str] = []

    def read() -> None:
        for line in process.stderr:
            if line.startswith("net "):
                done.append(time.perf_counter() - started)
            tail[:] = [*tail[-20:], line]

    reader = threading.Thread(target=read)
    reader.start()
    peak = 0
    while process.poll() is None:
        peak = max(peak, tree_memory(process.pid))
        time.sleep(0.05)
    reader.join()
    seconds = time.perf_counter() - started
    if process.returncode or not done:
        raise SystemExit("".join(tail))
    return {"seconds": seconds, "first": done[0], "last": done[-1], "nets": len(done), "peak": peak}


def finish_cost(data: Path, csv: Path, store: tuple[str, Path], nets: int = 40) -> dict[str, float]:
    """Milliseconds per net to log an imported net's params, per-epoch metrics and tags and end
    its run: through MLflow's client, and in one transaction; alternating, on one store."""
    os.environ["MLFLOW_TRACKING_URI"] = store[0]
    from mlflow import MlflowClient

    from nws.formats import nws as nws_format
    from nws.tracking import sql as sql_tracking
    from nws.tracking.artifacts import finish_through_client, net_result_entities

    row = nws_format.read_published_index(csv).to_dict("records")[0]
    net = nws_format.read_net(data / row["path"], row)
    history = nws_format.history_from_errors(net.errors)
    params = {**net.config.as_params(), "prints": PRINTS, "source": row["path"]}
    final = {"epochs": len(history) - 1}
    entities = net_result_entities(net.weights, history, final, {}, params, epoch_metrics=True)
    client = MlflowClient(store[0])
    experiment = client.create_experiment("finish", artifact_location=str(store[1] / "artifacts"))
    seconds = {"client": 0.0, "one transaction": 0.0}
    for i in range(2 * nets):
        run_id = client.create_run(experiment).info.run_id
        started = time.perf_counter()
        if i % 2:
            sql_tracking.finish_run(store[0], run_id, *entities)
        else:
            finish_through_client(client, run_id, entities)
        seconds["one transaction" if i % 2 else "client"] += time.perf_counter() - started
    return {way: 1e3 * s / nets for way, s in seconds.items()}


def measure(csv: Path, data: Path, workers: int, stores: Stores, cold: bool) -> float:
    """numpy.fromfile of every snapshot, then the import, back to back (the disk's speed drifts
    between minutes on a shared machine); prints both, returns the steady ratio."""
    snapshots = PRINTS * (len(csv.read_text().splitlines()) - 1)
    store = stores.fresh()
    if cold:
        drop_page_cache()
    rate_numpy = snapshots / numpy_read(data)
    if cold:
        drop_page_cache()
    run = import_once(csv, workers, store)
    shutil.rmtree(store[1], ignore_errors=True)  # the imported artifacts: gigabytes
    total = snapshots / run["seconds"]
    steady = PRINTS * (run["nets"] - 1) / (run["last"] - run["first"])
    print(f"  {workers} workers: numpy.fromfile {rate_numpy:5.0f} snapshots/s; import end to end "
          f"{total:4.0f}/s = {total / rate_numpy:.3f}x ({run['seconds']:.1f} s, first net after "
          f"{run['first']:.1f} s), steady {steady:4.0f}/s = {steady / rate_numpy:.3f}x "
          f"({1e3 * PRINTS / steady:.0f} ms/net); peak PSS {run['peak'] / 1e6:.0f} MB "
          "(target >= 0.5x)")  # fmt: skip
    return steady / rate_numpy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", type=int, default=100)
    parser.add_argument("--workers", default="1,2", help="comma list of worker counts")
    parser.add_argument("--memory-nets", default="25,100")
    parser.add_argument("--postgres", action="store_true", help="a PostgreSQL store instead of SQLite")
    parser.add_argument("--repeat", type=int, default=1, help="measurements per worker count (median)")
    args = parser.parse_args()
    data = Path(tempfile.mkdtemp(prefix="nws-import-bench-"))
    atexit.register(shutil.rmtree, data, True)  # gigabytes: never left behind
    csv = write_published(data, args.nets)
    snapshots = PRINTS * args.nets
    stores = Stores(data, args.postgres)
    counts = [int(w) for w in args.workers.split(",")]
    print(f"{args.nets} published nets, {snapshots} snapshots of 92,868 float64 weights; "
          f"store: {'PostgreSQL' if args.postgres else 'SQLite'}")  # fmt: skip
    try:
        for mode in ("warm", "cold"):
            if mode == "cold" and not drop_page_cache():
                print("cold: cannot drop the page cache here; skipped")
                continue
            print(f"{mode}:")
            ratios: dict[int, list[float]] = {workers: [] for workers in counts}
            for _ in range(args.repeat):
                for workers in counts:
                    ratios[workers].append(measure(csv, data, workers, stores, cold=mode == "cold"))
            if args.repeat > 1:
                print("  median steady ratio: " + ", ".join(
                    f"{w} workers {statistics.median(r):.3f}x" for w, r in ratios.items()))  # fmt: skip
        for count in (int(c) for c in args.memory_nets.split(",")):
            lines = csv.read_text().splitlines()
            part = csv.with_name(f"nws_fixed_train_{count}.csv")
            part.write_text("\n".join(lines[: count + 1]) + "\n")
            run = import_once(part, max(counts), stores.fresh())
            print(f"importing {count * PRINTS:5d} snapshots with {max(counts)} workers: peak PSS "
                  f"{run['peak'] / 1e6:5.0f} MB (all processes), {run['seconds']:.1f} s")  # fmt: skip
        print("target: peak memory flat in the number of snapshots")
        cost = finish_cost(data, csv, stores.fresh())
        print(f"ending a net's run (params, per-epoch metrics, tags): MLflow client "
              f"{cost['client']:.1f} ms/net, "
              f"one transaction {cost['one transaction']:.1f} ms/net "
              f"({cost['client'] / cost['one transaction']:.1f}x)")  # fmt: skip
    finally:
        stores.close()


if __name__ == "__main__":
    main()
