"""What a net costs beyond its training: per-net fixed cost against seconds per epoch, measured
through the real `nws sample` (processes, Optuna, MLflow, snapshots), side by side in one run.

For each backend and worker count, the same campaign (fixed subset, the default `main`'s images:
500 training, 200 evaluation, prints 4) is sampled twice into fresh stores, with E1 and E2
epochs per net. Per worker, wall = nets/workers x (fixed + epochs x epoch), so
  epoch  = workers x (wall(E2) - wall(E1)) / (nets x (E2 - E1))   (training steps + evaluation)
  fixed  = workers x wall(E1) / nets - E1 x epoch                 (build, tracing, data, MLflow,
                                                                   Optuna, process start, spread)
  in training = 3 epoch / (fixed + 3 epoch)                       (a default `main` net: 3 epochs)
  cores busy  = CPU seconds of the processes / wall               (at E2)
`--before` adds the same runs without what this benchmark measures: with `--before-tree DIR`
(a checkout of an earlier commit, e.g. `git worktree add DIR 4a3f645`) the earlier code runs
them; without it NWS_KEPT_GRAPHS=0 (every net builds and traces its own models and pipelines).
The same nets either way (one thread per net), bit for bit.
`--main-nets N` then samples the default `main`'s campaign (N nets, 3 epochs, 2 workers,
TensorFlow) without and with kept models: its sampling time before/after.

Run: python benchmarks/net_cost.py [--nets 24] [--epochs 1,7] [--backends tensorflow,jax]
                                   [--workers 1,2] [--before [--before-tree DIR]] [--main-nets 96]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_NET_EPOCHS = 3


def sample(
    backend: str, workers: int, nets: int, epochs: int, keep: bool, before_tree: str = ""
) -> tuple[float, float]:
    """Wall and CPU seconds of one `nws sample` campaign in a fresh store."""
    root = Path(tempfile.mkdtemp(prefix="net-cost-"))
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    if not keep and before_tree:
        env["PYTHONPATH"] = str(Path(before_tree).resolve())
    elif not keep:
        env["NWS_KEPT_GRAPHS"] = "0"
    command = [
        sys.executable, "-m", "nws.cli", "sample", "--subset", "fixed", "--n-nets", str(nets),
        "--threads", "1",
        "--prints", "4", "--max-epochs", str(epochs), "--min-epochs", str(epochs),
        "--max-train-images", "500", "--max-eval-images", "200", "--workers", str(workers),
        "--backend", backend, "--campaign", "net-cost", "--storage", str(root / "journal.log"),
        "--experiment", "net-cost",
    ]  # fmt: skip
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=root, capture_output=True, text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    shutil.rmtree(root, ignore_errors=True)
    if done.returncode != 0:
        raise SystemExit(f"nws sample failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", type=int, default=24)
    parser.add_argument("--epochs", default="1,7", help="E1,E2")
    parser.add_argument("--backends", default="tensorflow,jax")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--before", action="store_true", help="also measure without kept models")
    parser.add_argument("--before-tree", default="", help="an earlier checkout runs the `--before` rows")
    parser.add_argument("--main-nets", type=int, default=0, help="the default main's sampling (0: skip)")
    args = parser.parse_args()
    e1, e2 = (int(e) for e in args.epochs.split(","))
    before = f"the code in {args.before_tree}" if args.before_tree else "NWS_KEPT_GRAPHS=0"
    print(f"kept no: {before}", flush=True)
    print(f"{args.nets} nets per campaign, fixed subset, 500/200 images, epochs {e1} and {e2}; "
          f"{os.cpu_count()} cores", flush=True)  # fmt: skip
    header = (f"{'backend':<11} {'workers':>7} {'kept':>5} {'fixed s':>8} {'epoch s':>8} {'ratio':>6} "
              f"{'in training':>11} {'cores busy':>10} {'wall E1 s':>9} {'wall E2 s':>9}")  # fmt: skip
    print(header, flush=True)
    for backend in args.backends.split(","):
        for workers in (int(w) for w in args.workers.split(",")):
            for keep in (False, True) if args.before else (True,):
                wall1, _ = sample(backend, workers, args.nets, e1, keep, args.before_tree)
                wall2, cpu2 = sample(backend, workers, args.nets, e2, keep, args.before_tree)
                epoch = workers * (wall2 - wall1) / (args.nets * (e2 - e1))
                fixed = workers * wall1 / args.nets - e1 * epoch
                training = DEFAULT_NET_EPOCHS * epoch / (fixed + DEFAULT_NET_EPOCHS * epoch)
                print(f"{backend:<11} {workers:>7} {'yes' if keep else 'no':>5} {fixed:>8.2f} {epoch:>8.2f} "
                      f"{fixed / epoch:>6.1f} {training:>11.0%} {cpu2 / wall2:>10.2f} {wall1:>9.1f} "
                      f"{wall2:>9.1f}", flush=True)  # fmt: skip
    if args.main_nets:
        walls = [
            sample("tensorflow", 2, args.main_nets, DEFAULT_NET_EPOCHS, keep)[0] for keep in (False, True)
        ]
        print(f"default main's sampling ({args.main_nets} nets, 2 workers): {walls[0]:.0f} s without kept "
              f"models, {walls[1]:.0f} s with ({walls[0] / walls[1]:.2f}x)")  # fmt: skip


if __name__ == "__main__":
    main()
