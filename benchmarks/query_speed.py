"""`train`'s run query over many net runs in MLflow's default SQLite store: seconds per query.

Creates N net runs (the 13 properties as params, the tags and metrics of a sampled net, no
artifacts) in a fresh SQLite store, then times `train`'s selection (`nws.zoo.query.query_nets`)
with the built-in condition alone and with typical user filters.

Run: python benchmarks/query_speed.py [--runs 10000]
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import tempfile
import time

import numpy as np


def make_runs(n: int) -> None:
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    from nws.space import PAPER_DATASETS, PROPERTIES
    from nws.tracking.tags import (
        TAG_CAMPAIGN,
        TAG_ROLE,
        TAG_SNAPSHOTS,
        TAG_SUBSET,
        TAG_WEIGHTS_DIGEST,
        TAG_WEIGHTS_SHAPE,
    )

    client = MlflowClient()
    experiment = client.get_experiment_by_name("Default").experiment_id
    rng = np.random.default_rng(0)
    now = int(time.time() * 1000)
    for i in range(n):
        run = client.create_run(experiment, run_name=f"net-{i:05d}")
        params = [Param(p.name, str(p.options[rng.integers(len(p.options))] if p.is_categorical
                                    else rng.uniform(p.low, p.high))) for p in PROPERTIES]  # fmt: skip
        params[0] = Param("dataset", PAPER_DATASETS[i % 5])
        tags = [
            RunTag(k, v)
            for k, v in {
                TAG_ROLE: "net", TAG_SUBSET: "main", TAG_CAMPAIGN: f"c{i % 4}",
                TAG_SNAPSHOTS: "complete", TAG_WEIGHTS_SHAPE: "20x92868",
                TAG_WEIGHTS_DIGEST: "0" * 32,
            }.items()
        ]  # fmt: skip
        values = {"test_accuracy": float(rng.uniform()), "weightn_conv": 16880.0, "weightn_fc": 75988.0}
        metrics = [Metric(k, v, now, 0) for k, v in values.items()]
        client.log_batch(run.info.run_id, metrics=metrics, params=params, tags=tags)
        client.set_terminated(run.info.run_id, "FINISHED")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10000)
    args = parser.parse_args()

    import mlflow

    from nws.commands.options import Selection

    root = tempfile.mkdtemp(prefix="nws-query-bench-")
    atexit.register(shutil.rmtree, root, True)  # gigabytes: never left behind
    os.chdir(root)
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    started = time.perf_counter()
    make_runs(args.runs)
    print(f"created {args.runs} net runs in {time.perf_counter() - started:.0f} s")
    for label, selection in (
        ("built-in condition only", Selection()),
        ("+ params.dataset = 'mnist'", Selection(filter="params.dataset = 'mnist'")),
        ("+ metrics.test_accuracy >= 0.5", Selection(min_test_accuracy=0.5)),
        (
            "+ campaign tag and dataset",
            Selection(filter="tags.`nws.campaign` = 'c1' and params.dataset = 'svhn'"),
        ),
    ):
        times = []
        for _ in range(3):
            t = time.perf_counter()
            nets = selection.query()
            times.append(time.perf_counter() - t)
        print(f"{label:<34} {len(nets):>6} nets  {min(times):6.2f} s (best of 3)")


if __name__ == "__main__":
    main()
