"""Does the DMC's slice sampler ever starve training? Measured side by side in one process:

  sampler      training steps fed by `nws.meta.dmc.slice_batches` (a fresh random slice for every
               sample, read from the consolidated store on disk);
  in-memory    the same steps fed from batches already in memory;
and, beside them, the sampler's slices per second against a plain numpy copy of the same bytes
from an in-memory array. Target: sampler step time <= 1.05x in-memory.

Run: python benchmarks/dmc_input.py [--slice-length 5000] [--steps 8] [--nets 40]
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from synthetic import N_WEIGHTS, PRINTS, synthetic_store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slice-length", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--nets", type=int, default=40)
    args = parser.parse_args()

    import keras
    import tensorflow as tf

    from nws.backend import configure_tensorflow
    from nws.meta.dmc import Budget, build_dmc, slice_batches
    from nws.meta.samples import Samples
    from nws.zoo.store import Zoo

    configure_tensorflow(deterministic=False)
    root = Path(tempfile.mkdtemp(prefix="nws-dmc-bench-"))
    atexit.register(shutil.rmtree, root, True)  # gigabytes: never left behind
    synthetic_store(root / "store", args.nets)
    zoo = Zoo(root / "store")
    labels = np.arange(args.nets) % 5
    samples = Samples.of(zoo, np.arange(args.nets), labels, (1, PRINTS), "all", args.slice_length)
    b, length = args.batch_size, args.slice_length

    # Sampler throughput against a plain numpy copy of the same number of bytes.
    rng = np.random.default_rng(0)
    index = rng.integers(0, len(samples), 64 * b)
    t = time.perf_counter()
    for chunk in np.split(index, 64):
        samples.random_slices(chunk, rng)
    sampler_rate = len(index) / (time.perf_counter() - t)
    memory = rng.standard_normal((len(samples) // 4, N_WEIGHTS), dtype=np.float32)
    t = time.perf_counter()
    for chunk in np.split(index % len(memory), 64):
        starts = rng.integers(0, N_WEIGHTS - length, len(chunk))
        np.stack([memory[r, s : s + length] for r, s in zip(chunk, starts, strict=True)])
    numpy_rate = len(index) / (time.perf_counter() - t)

    model = build_dmc(length, 5)
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))  # fmt: skip
    fed = slice_batches(samples, b, seed=0, plan=Budget(1, args.steps))
    x = rng.standard_normal((b, length), dtype=np.float32)
    y = rng.integers(0, 5, b)
    in_memory = tf.data.Dataset.from_tensors((x, y)).repeat()

    def seconds_per_step(dataset) -> float:
        model.fit(dataset, epochs=1, steps_per_epoch=2, verbose=0)  # trace / warm up
        t = time.perf_counter()
        model.fit(dataset, epochs=1, steps_per_epoch=args.steps, verbose=0)
        return (time.perf_counter() - t) / args.steps

    timings = {"in-memory": [], "sampler": []}
    for _ in range(2):  # interleaved
        timings["in-memory"].append(seconds_per_step(in_memory))
        timings["sampler"].append(seconds_per_step(fed))
    best = {k: min(v) for k, v in timings.items()}
    print(f"DMC at slice length {length}, batch {b}, {args.steps} steps, zoo {zoo.size_bytes / 1e9:.2f} GB")
    for name, value in best.items():
        print(f"{name:>10}: {value * 1000:8.1f} ms/step  (runs: {[round(v * 1000) for v in timings[name]]})")
    print(f"sampler / in-memory = {best['sampler'] / best['in-memory']:.3f}  (target <= 1.05)")
    print(f"slice sampler {sampler_rate:,.0f} slices/s; numpy copy of the same bytes {numpy_rate:,.0f}/s")


if __name__ == "__main__":
    main()
