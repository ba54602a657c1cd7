"""How busy one TensorFlow worker keeps its core: nets trained one after another in one process
(one thread, the kept models and pipelines a worker uses), each net's wall time against its CPU
time. A worker that waits (on its input pipelines, on a lock) shows fewer than 1.00 cores busy;
`benchmarks/net_cost.py` measures the same through the real `nws sample`, MLflow and Optuna
included.

Run: python benchmarks/net_busy.py [--nets 4] [--epochs 6] [--batch-size 32] [--augmentation off]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from net_setup import CONFIG, single_thread_tensorflow  # the script beside this one


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--augmentation", default="off")
    args = parser.parse_args()
    single_thread_tensorflow()
    from nws.data import load_images, split_for_net
    from nws.net.training import TrainSettings, train_net
    from nws.space import NetConfig

    settings = TrainSettings(max_epochs=args.epochs, min_epochs=args.epochs)
    config = NetConfig.parse(CONFIG.format(batch_size=args.batch_size, augmentation=args.augmentation))
    for seed in range(args.nets):
        data = split_for_net(load_images("shapes"), seed, 500, 200, fidelity="paper")
        wall, cpu = time.perf_counter(), time.process_time()
        train_net(config, data, seed, settings, [])
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        print(f"net {seed}: wall {wall:.2f} s, cpu {cpu:.2f} s, {cpu / wall:.2f} cores busy", flush=True)


if __name__ == "__main__":
    main()
