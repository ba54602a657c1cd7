"""Building the zoo from N nets' artifacts, against reading the same bytes with numpy.

Creates N net runs of the fixed architecture in a fresh SQLite store (random float32 snapshots,
the tags and metrics a sampled net carries), then measures side by side:
  numpy        np.load of every run's snapshots/weights.npy from the artifact store;
  verify       the verification alone: every file mapped and hashed (xxh3-128) against its run's
               digest tag, in parallel, as every build_zoo call does before anything is read;
  first        query + fetch + verify + index, with an empty cache;
  cached       query + verify + the store found intact (what a second `train` call costs);
  cached+read  the same, then every snapshot read once from the store.
Targets: first <= 2x numpy, cached <= 1.2x numpy. Measured twice: with the files in the page
cache (warm), and with the page cache dropped before every variant (cold; needs root). Written
data is synced before each variant, so one variant's write-back never throttles the next.

Run: python benchmarks/zoo_build.py [--nets 200] [--prints 20] [--workers 8]
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from pagecache import drop_page_cache

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def make_runs(n: int, prints: int) -> None:
    import mlflow

    from nws.net.snapshots import weight_layout
    from nws.space import NetConfig
    from nws.tracking.artifacts import log_net_result
    from nws.tracking.tags import TAG_ROLE

    config = NetConfig.parse("mnist,0.001,64,1,0,0,0,2,5,3,2,8,128")
    layout = weight_layout(config)
    rng = np.random.default_rng(0)
    with mlflow.start_run(run_name="benchmark-campaign"):
        for i in range(n):
            with mlflow.start_run(run_name=f"net-{i}", nested=True, tags={TAG_ROLE: "net"}):
                mlflow.log_params({**config.as_params(), "dataset": ["mnist", "cifar10"][i % 2]})
                weights = rng.standard_normal((prints, layout.n_weights), dtype=np.float32)
                log_net_result(
                    weights, {"n_weights": layout.n_weights}, [{"epoch": 0, "train_accuracy": 0.0,
                    "valid_accuracy": 0.0, "test_accuracy": 0.5, "loss": 1.0, "valid_loss": 1.0,
                    "test_loss": 1.0, "valid_accuracy_smoothed": 0.0}],
                    {"test_accuracy": 0.5, "weightn_conv": layout.weightn_conv,
                     "weightn_fc": layout.weightn_fc}, {},
                )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", type=int, default=200)
    parser.add_argument("--prints", type=int, default=20)
    parser.add_argument("--workers", type=int, default=8)
    args = parser.parse_args()

    import mlflow

    from nws.commands.options import Selection
    from nws.zoo.cache import ArtifactCache, _local_path
    from nws.zoo.store import build_zoo

    root = tempfile.mkdtemp(prefix="nws-zoo-bench-")
    atexit.register(shutil.rmtree, root, True)  # gigabytes: never left behind
    os.chdir(root)
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    started = time.perf_counter()
    make_runs(args.nets, args.prints)
    print(f"created {args.nets} net runs in {time.perf_counter() - started:.1f} s ({root})")

    nets = Selection().query()
    paths = [_local_path(uri) / "snapshots" / "weights.npy" for uri in nets["artifact_uri"]]
    total = sum(p.stat().st_size for p in paths)

    def numpy_read() -> float:
        t = time.perf_counter()
        checksum = 0.0
        for path in paths:
            checksum += float(np.load(path)[0, 0])
        return time.perf_counter() - t

    def verify() -> float:
        t = time.perf_counter()
        checker = ArtifactCache(tempfile.mkdtemp(dir=root))
        rows = list(nets.itertuples())
        with ThreadPoolExecutor(max_workers=args.workers) as pool:
            list(pool.map(lambda r: checker.verify(r.run_id, r.artifact_uri, r.digest), rows))
        assert checker.stats.verified == len(rows)
        return time.perf_counter() - t

    def first() -> float:
        t = time.perf_counter()
        build_zoo(Selection().query(), ArtifactCache(tempfile.mkdtemp(dir=root)), workers=args.workers)
        return time.perf_counter() - t

    cache = ArtifactCache(tempfile.mkdtemp(dir=root))
    build_zoo(nets, cache, workers=args.workers)

    def cached(read: bool) -> float:
        t = time.perf_counter()
        zoo = build_zoo(Selection().query(), ArtifactCache(cache.root), workers=args.workers)
        if read:
            for i in range(len(zoo)):
                zoo.gather(zoo.row_start(np.full(args.prints, i), np.arange(1, args.prints + 1)),
                           int(zoo.lengths[i]))  # fmt: skip
        return time.perf_counter() - t

    variants = {"numpy": numpy_read, "verify": verify, "first": first, "cached": lambda: cached(False),
                "cached+read": lambda: cached(True)}  # fmt: skip
    print(f"{args.nets} nets x {args.prints} snapshots, {total / 1e9:.2f} GB, {args.workers} workers")
    for mode in ("warm", "cold"):
        if mode == "cold" and not drop_page_cache():
            print("cold: cannot drop the page cache here (needs root); skipped")
            continue
        numpy_read()
        results: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(3 if mode == "warm" else 2):
            for name, variant in variants.items():
                os.sync()  # the previous variant's writes must not throttle this one
                if mode == "cold":
                    drop_page_cache()
                results[name].append(variant())
        best = {k: min(v) for k, v in results.items()}
        for name, seconds in best.items():
            print(f"{mode} {name:>12}: {seconds:7.3f} s  ({total / seconds / 1e9:5.2f} GB/s)  "
                  f"x{seconds / best['numpy']:.2f} numpy")  # fmt: skip
    print("targets: first <= 2x numpy, cached <= 1.2x numpy")


if __name__ == "__main__":
    main()
