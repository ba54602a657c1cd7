"""A net's setup inside one worker, without MLflow or process start: six nets in one process
(three without augmentation, then three with), each 6 epochs of 500 shapes images; per net the
time to its first evaluation, the extra time of its first epoch over its later ones, and its
later epochs' mean. The first net of each graph traces; the next two reuse kept models.

Run: python benchmarks/net_setup.py                       (this checkout, models kept)
     python benchmarks/net_setup.py --fresh               (every net builds its own)
     PYTHONPATH=DIR python benchmarks/net_setup.py --old  (an earlier checkout in DIR)
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

CONFIG = ("lrate=0.002,batch_size={batch_size},batch_norm=on,augmentation={augmentation},optimizer=adam,"
          "activation=relu,initialization=glorot_uniform,filter_size=5,depth_conv=3,depth_fc=2,width_conv=8,width_fc=128,"
          "dataset=shapes")  # fmt: skip


def single_thread_tensorflow() -> None:
    """TensorFlow on one thread, deterministic: a worker of `nws sample` with its defaults."""
    from nws import backend

    backend.select("tensorflow")
    backend.tensorflow_environment(1)
    backend.configure(True, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fresh", action="store_true", help="keep no models")
    parser.add_argument("--old", action="store_true", help="an earlier checkout (no `kept` argument)")
    args = parser.parse_args()
    single_thread_tensorflow()
    from nws.data import load_images, split_for_net
    from nws.net.training import TrainSettings, train_net
    from nws.space import NetConfig

    settings = TrainSettings(max_epochs=6, min_epochs=6)
    extra = {"kept": None} if args.fresh and not args.old else {}
    for augmentation in ("off", "on"):
        for seed in range(3):
            config = NetConfig.parse(CONFIG.format(batch_size=64, augmentation=augmentation))
            data = split_for_net(load_images("shapes"), seed, 500, 200, fidelity="paper")
            stamps = [
                h["elapsed_seconds"] for h in train_net(config, data, seed, settings, [], **extra).history
            ]
            later = (stamps[-1] - stamps[1]) / (len(stamps) - 2)
            first = stamps[1] - stamps[0] - later
            print(f"augmentation {augmentation} net {seed}: first evaluation {stamps[0]:.2f} s, "
                  f"first epoch +{first:.2f} s, later epochs {later:.2f} s", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
