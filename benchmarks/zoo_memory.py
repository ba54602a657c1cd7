"""Peak resident memory while the DMC trains on zoos of growing size (slices read from disk).

Each size trains in a fresh process on a synthetic consolidated store; the figure is that
process's peak RSS. Target: flat in the zoo's size (a 6 GB zoo trains under 1.5 GB resident).

Run: python benchmarks/zoo_memory.py [--sizes-gb 0.6,6] [--slice-length 5000] [--steps 30]
"""

from __future__ import annotations

import argparse
import atexit
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = Path(__file__).resolve().parent


def train(store: str, slice_length: int, steps: int) -> None:
    """The child: train the DMC for `steps` steps on random slices of the whole store."""
    import numpy as np

    from nws.backend import configure_tensorflow
    from nws.meta import create
    from nws.meta.base import MetaSettings, Task
    from nws.meta.samples import Samples
    from nws.zoo.store import Zoo

    configure_tensorflow(deterministic=False)
    zoo = Zoo(Path(store))
    nets = np.arange(len(zoo))
    samples = Samples.of(zoo, nets, nets % 5, (1, 20), "all", slice_length)
    batch = 64
    settings = MetaSettings(slice_length=slice_length, epochs=1, batch_size=batch)
    model = create("dmc", Task("dataset", tuple("abcde")), settings)
    # One "epoch" of `steps` steps: the samples cover every net of the store.
    index = np.random.default_rng(0).choice(len(samples), steps * batch)
    model.fit(samples.subset(index), samples.subset(index[:0]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-gb", default="0.6,6")
    parser.add_argument("--slice-length", type=int, default=5000)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--child", default="")
    args = parser.parse_args()
    if args.child:
        train(args.child, args.slice_length, args.steps)
        return

    sys.path.insert(0, str(HERE))
    from synthetic import N_WEIGHTS, PRINTS, store_bytes, synthetic_store

    root = Path(tempfile.mkdtemp(prefix="nws-mem-bench-"))
    atexit.register(shutil.rmtree, root, True)  # gigabytes: never left behind
    per_net = PRINTS * N_WEIGHTS * 4
    for size in (float(s) for s in args.sizes_gb.split(",")):
        nets = max(1, round(size * 1e9 / per_net))
        store = synthetic_store(root / f"store-{size}", nets)
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, __file__, "--child", str(store), "--slice-length", str(args.slice_length),
             "--steps", str(args.steps)],
            check=True,
        )  # fmt: skip
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        bytes_ = store_bytes(store)
        note = "" if peak > before else " (peak of an earlier, larger child)"
        print(f"zoo {bytes_ / 1e9:5.2f} GB ({nets} nets): peak RSS {peak / 1e6:5.2f} GB{note}, "
              f"{time.perf_counter() - started:.0f} s")  # fmt: skip
        for file in (store / "files").iterdir():
            file.unlink()
    print("target: flat; a 6 GB zoo trains under 1.5 GB resident")


if __name__ == "__main__":
    main()
