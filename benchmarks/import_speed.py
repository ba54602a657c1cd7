"""`import_nws` throughput against plain numpy.fromfile of the same files, and its peak memory.

Writes N nets of the fixed architecture in the published layout (20 float64 snapshots each),
then measures side by side: np.fromfile of every snapshot file, and the import into a fresh
SQLite store (snapshots per second; target at least 0.5x numpy). Peak resident memory of import
processes of growing size shows whether memory grows with the count (target: flat).
Both with the files in the page cache (warm) and, where allowed, after dropping it (cold).

Run: python benchmarks/import_speed.py [--nets 100] [--workers 2] [--memory-nets 25,100]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from pagecache import drop_page_cache

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FIXED = ["mnist", 0.0021, 64, 1, 0, 0, 0, 2, 5, 3, 2, 8, 128]


def write_published(root: Path, nets: int) -> Path:
    sys.path.insert(0, str(ROOT))
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


def import_once(csv: Path, workers: int, limit_nets: int | None = None) -> tuple[float, int]:
    """Seconds and peak RSS (kB) of one `nws import_nws` process into a fresh store."""
    store = tempfile.mkdtemp(prefix="nws-import-store-")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store}/mlflow.db"}
    if limit_nets is not None:
        lines = csv.read_text().splitlines()
        csv = csv.with_name(f"nws_fixed_train_{limit_nets}.csv")
        csv.write_text("\n".join(lines[: limit_nets + 1]) + "\n")
    code = ("import resource, sys, time; from nws.cli import main; t = time.perf_counter(); "
            f"rc = main(['import_nws', '--csv', {str(csv)!r}, '--workers', '{workers}']); "
            "print('SECONDS', time.perf_counter() - t); "
            "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=store, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-2000:])
    values = dict(line.split() for line in done.stdout.splitlines() if line.startswith(("SECONDS", "PEAK")))
    return float(values["SECONDS"]), int(values["PEAK"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--memory-nets", default="25,100")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="nws-import-bench-"))
    csv = write_published(root, args.nets)
    snapshots = 20 * args.nets
    print(
        f"{args.nets} published nets, {snapshots} snapshots of 92,868 float64 weights, {args.workers} workers"
    )
    for mode in ("warm", "cold"):
        if mode == "cold" and not drop_page_cache():
            print("cold: cannot drop the page cache here; skipped")
            continue
        seconds_numpy = numpy_read(root)
        if mode == "cold":
            drop_page_cache()
        seconds_import, _ = import_once(csv, args.workers)
        rate_numpy, rate_import = snapshots / seconds_numpy, snapshots / seconds_import
        print(f"{mode}: numpy.fromfile {rate_numpy:9.0f} snapshots/s; import {rate_import:7.0f} snapshots/s "
              f"= {rate_import / rate_numpy:.3f}x numpy (target >= 0.5x)")  # fmt: skip
    for count in (int(c) for c in args.memory_nets.split(",")):
        seconds, peak = import_once(csv, args.workers, limit_nets=count)
        print(f"importing {count * 20:5d} snapshots: peak RSS {peak / 1e3:6.0f} MB, {seconds:.1f} s")
    print("target: peak memory flat in the number of snapshots")


if __name__ == "__main__":
    main()
