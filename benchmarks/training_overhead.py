"""Training-loop overhead on the fixed architecture, measured side by side in one process.

Compares per-epoch wall time (median over epochs after the first, which includes tracing) of:
  plain      a plain `model.fit(x, y, validation_data=...)` of the same compiled model on the
             same images (one class-balanced epoch, as float32 arrays), plus `model.evaluate`
             of the test set per epoch (the same evaluation work our loop does);
  nws        `nws.net.training.train_net` without observers;
  nws+log    the full net job: snapshot capture to disk and MLflow logging (local SQLite).
Targets: nws / plain <= 1.10; (nws+log - nws) / nws < 3 %.

Run: python benchmarks/training_overhead.py [--backend tensorflow|jax] [--dataset shapes] [--epochs 8]
     [--repeats 2]
"""

from __future__ import annotations

import argparse
import atexit
import itertools
import os
import shutil
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

FIXED = "dataset={d},lrate=0.001,batch_size=64,batch_norm=on,augmentation=off,optimizer=adam,activation=relu,initialization=glorot_uniform,filter_size=5,depth_conv=3,depth_fc=2,width_conv=8,width_fc=128"  # noqa: E501


def epoch_times(stamps: list[float]) -> float:
    """Median epoch duration, leaving out the first epoch (graph tracing)."""
    durations = [b - a for a, b in itertools.pairwise(stamps)]
    return statistics.median(durations[1:])


def plain_fit(config, data, epochs: int, seed: int) -> float:
    import keras
    import numpy as np

    from nws.backend import seed as seed_backend
    from nws.data import BalancedSampler
    from nws.net.training import TrainSettings, compile_model

    seed_backend(seed)
    index = BalancedSampler(data.y_train, seed).epoch()
    x = data.x_train[index].astype(np.float32) / 255.0
    y = data.y_train[index]
    xv, yv = data.x_valid.astype(np.float32) / 255.0, data.y_valid
    xt, yt = data.x_test.astype(np.float32) / 255.0, data.y_test
    steps = len(y) // config.batch_size
    model = compile_model(config, steps, TrainSettings())
    stamps: list[float] = []

    class Clock(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if not stamps:
                stamps.append(time.perf_counter())

        def on_epoch_end(self, epoch, logs=None):
            model.evaluate(xt, yt, batch_size=1024, verbose=0)
            stamps.append(time.perf_counter())

    model.fit(
        x[: steps * config.batch_size],
        y[: steps * config.batch_size],
        batch_size=config.batch_size,
        epochs=epochs,
        validation_data=(xv, yv),
        validation_batch_size=1024,
        callbacks=[Clock()],
        verbose=0,
    )
    return epoch_times(stamps)


def nws_fit(config, data, epochs: int, seed: int) -> float:
    from nws.net.training import TrainSettings, train_net

    stamps: list[float] = []
    settings = TrainSettings(max_epochs=epochs, min_epochs=epochs)
    train_net(config, data, seed, settings, [lambda m, e, x: stamps.append(time.perf_counter())])
    return epoch_times(stamps[1:]) if len(stamps) > 2 else float("nan")


def nws_logged(config, data, epochs: int, seed: int, options) -> float:
    import dataclasses

    import mlflow

    from nws.campaign.net_job import NetJob
    from nws.net.training import TrainSettings

    stamps: list[float] = []
    settings = dataclasses.replace(
        options.settings(), train=TrainSettings(max_epochs=epochs, min_epochs=epochs)
    )
    job = NetJob(settings, seed, config, {})
    with mlflow.start_run(run_name="benchmark-campaign"):
        job.run(observers=[lambda m, e, x: stamps.append(time.perf_counter())])
    return epoch_times(stamps[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="shapes")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-train-images", type=int, default=0)
    parser.add_argument("--backend", default="tensorflow", help="Keras backend: tensorflow or jax")
    args = parser.parse_args()

    from nws.backend import configure, select

    select(args.backend)  # before Keras is imported

    import mlflow

    from nws.commands.sample import SampleOptions
    from nws.data import load_images, split_for_net
    from nws.space import NetConfig

    configure()
    tmp = tempfile.mkdtemp(prefix="nws-bench-")
    atexit.register(shutil.rmtree, tmp, True)  # gigabytes: never left behind
    os.chdir(tmp)  # MLflow's artifact root (./mlruns) goes there too
    mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
    config = NetConfig.parse(FIXED.format(d=args.dataset))
    data = split_for_net(load_images(args.dataset), 0, args.max_train_images)
    options = SampleOptions(max_train_images=args.max_train_images, prints=20, backend=args.backend)
    sizes = data.sizes()
    print(
        f"backend {args.backend}, dataset {args.dataset}: {sizes}, fixed architecture, {args.epochs} epochs"
    )
    results: dict[str, list[float]] = {"plain": [], "nws": [], "nws+log": []}
    for repeat in range(args.repeats):  # interleaved, so drift hits every variant alike
        results["plain"].append(plain_fit(config, data, args.epochs, repeat))
        results["nws"].append(nws_fit(config, data, args.epochs, repeat))
        results["nws+log"].append(nws_logged(config, data, args.epochs, repeat, options))
    best = {k: min(v) for k, v in results.items()}
    for name, value in best.items():
        runs = [round(t, 3) for t in results[name]]
        print(f"{name:>8}: {value * 1000:8.1f} ms/epoch  (runs: {runs})")
    print(f"nws / plain fit           = {best['nws'] / best['plain']:.3f}  (target <= 1.10)")
    overhead = (best["nws+log"] - best["nws"]) / best["nws"]
    print(f"snapshot + MLflow overhead = {overhead * 100:+.1f} %  (target < 3 %)")


if __name__ == "__main__":
    main()
