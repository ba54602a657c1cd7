"""Training throughput of packed nets (`sample --pack`): training images per second summed over
the nets of a pack, and nets per hour, for pack sizes 1, 8, 32 and 128 (where memory allows), on
each Keras backend installed here, side by side in one table, with a projected full NWS rebuild.

Imports no TensorFlow (except in the TensorFlow column's own process), MLflow or Optuna: it runs
on a machine with jax, numpy and keras only (and this repository on PYTHONPATH). Each backend
runs in a child process (a process has one Keras backend). Per backend the lone net's path
(Keras `fit` on a generator of class-balanced batches, as `sample` trains) is the baseline;
packs run `nws.net.pack.PackTrainer`'s vmapped step (JAX only). Images are random uint8 images on
the device, so the figures measure training, not data loading.

nets/hour = 3600 P / ((epochs_per_net + 1) (train_images P / img_s + eval_images P s_per_eval_image)):
evaluation is counted one net at a time (as the pack trainer evaluates), the +1 is the
evaluation of the initialisation, counted as a whole epoch. epochs_per_net is the mean epoch
count of our own early stopping, measured on a campaign of nets (`--epochs-from`, by default
benchmarks/data/early_stopping_epochs.json, made by benchmarks/early_stopping_epochs.py);
train_images and eval_images default to the mean over the paper's five datasets (90 % of the
training pool per epoch; validation plus test per evaluation). The projection is 16,000 nets /
nets per hour at the best pack size.

Run: python benchmarks/pack_throughput.py --device gpu --budget 420
     python benchmarks/pack_throughput.py --device cpu --budget 300 --packs 1,8,32
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time

FIXED = (
    "dataset=shapes,lrate=0.001,batch_size={batch},batch_norm=on,augmentation={augment},optimizer=adam,"
    "activation=relu,initialization=glorot_uniform,filter_size=5,depth_conv=3,depth_fc=2,width_conv=8,"
    "width_fc=128"
)
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")
EPOCHS_FILE = os.path.join(HERE, "data", "early_stopping_epochs.json")
PAPER_DATASETS = {  # official training and test images, training images left out by fidelity paper
    "mnist": (60_000, 10_000, 5_000),
    "cifar10": (50_000, 10_000, 0),
    "svhn": (73_257, 26_032, 0),
    "stl10": (5_000, 8_000, 0),
    "fashion": (60_000, 10_000, 5_000),
}


def paper_images_per_epoch() -> tuple[int, int]:
    """Mean images per net and epoch over the paper's datasets (nets draw them uniformly):
    training (90 % of the pool, class balance ignored) and evaluation (validation + test)."""
    pools = [(train - dropped, test) for train, test, dropped in PAPER_DATASETS.values()]
    train = sum(0.9 * pool for pool, _ in pools) / len(pools)
    evaluated = sum(0.1 * pool + test for pool, test in pools) / len(pools)
    return round(train), round(evaluated)


TRAIN_IMAGES, EVAL_IMAGES = paper_images_per_epoch()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--budget", type=float, default=420.0, help="seconds for the whole run")
    p.add_argument("--packs", default="1,8,32,128")
    p.add_argument("--backends", default="auto", help="comma list of jax, tensorflow; auto: installed ones")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--augment", action="store_true")
    p.add_argument("--train-images", type=int, default=TRAIN_IMAGES, help="per net and epoch (paper mean)")
    p.add_argument(
        "--eval-images", type=int, default=EVAL_IMAGES, help="validation + test, per net and epoch"
    )
    p.add_argument(
        "--epochs-from", default=EPOCHS_FILE, help="epoch counts measured by early_stopping_epochs.py"
    )
    p.add_argument("--epochs-per-net", type=float, default=0, help="assume this instead of --epochs-from")
    p.add_argument("--nets", type=int, default=16_000, help="nets of the projected rebuild (the paper's zoo)")
    p.add_argument("--out", default="", help="write the results as JSON here")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)  # backend of a child process
    return p.parse_args(argv)


def installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# ----------------------------------------------------------------------------------- child
def child(args: argparse.Namespace) -> None:
    """One backend: one JSON line per measured cell on stdout, then the heavy modules it imported."""
    sys.path.insert(0, ROOT)
    os.environ["KERAS_BACKEND"] = args.child
    if args.device == "cpu":
        os.environ["JAX_PLATFORMS"] = "cpu"
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # report real peak memory
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    started = time.perf_counter()
    import keras
    import numpy as np

    from nws.backend import seed as seed_backend
    from nws.data.preprocess import NetData
    from nws.net.training import TrainSettings, compile_model
    from nws.space import NetConfig

    def emit(**row: object) -> None:
        print(json.dumps({"backend": args.child, **row}), flush=True)

    device = _check_device(args)
    emit(kind="device", device=device, keras=keras.__version__)
    config = NetConfig.parse(FIXED.format(batch=args.batch, augment="on" if args.augment else "off"))
    B = args.batch
    rng = np.random.default_rng(0)
    n_images = 2048  # the nets of a pack share one dataset's images on the device, as in a campaign
    images = rng.integers(0, 256, (n_images, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, n_images).astype(np.int32)
    packs = [int(p) for p in args.packs.split(",")]
    cells = ["alone"] + ([p for p in packs] if args.child == "jax" else [])
    deadline = started + args.budget

    def slice_left(remaining_cells: int) -> float:
        return max(5.0, (deadline - time.perf_counter()) / max(1, remaining_cells))

    # Baseline: one net alone, the sampling loop's path (Keras fit on index batches).
    t0 = time.perf_counter()
    seed_backend(0)
    model = compile_model(config, 100, TrainSettings())
    steps = 20

    def batches():
        while True:
            idx = rng.integers(0, n_images, B)
            yield images[idx].astype(np.float32) * np.float32(1 / 255), labels[idx]

    stamps: list[float] = []
    clock = keras.callbacks.LambdaCallback(on_epoch_end=lambda e, logs: stamps.append(time.perf_counter()))
    model.fit(batches(), steps_per_epoch=steps, epochs=2, callbacks=[clock], verbose=0)  # compile
    setup = time.perf_counter() - t0
    window = slice_left(len(cells)) - setup
    epochs = max(2, int(window / max(1e-3, stamps[-1] - stamps[-2])))
    stamps.clear()
    model.fit(batches(), steps_per_epoch=steps, epochs=epochs, callbacks=[clock], verbose=0)
    per_step = min(b - a for a, b in itertools.pairwise(stamps)) / steps
    eval_x = images[:1024].astype(np.float32) / 255
    model.evaluate(eval_x, labels[:1024], batch_size=1024, verbose=0)
    t = time.perf_counter()
    model.evaluate(eval_x, labels[:1024], batch_size=1024, verbose=0)
    eval_per_image = (time.perf_counter() - t) / 1024
    emit(
        kind="cell",
        pack=1,
        path="keras fit",
        images_per_s=B / per_step,
        setup_s=setup,
        eval_s_per_image=eval_per_image,
        **_nets_per_hour(args, 1, B / per_step, eval_per_image),
    )
    if args.child != "jax":
        return
    import jax

    from nws.net.pack import PackTrainer

    data = NetData(images, labels.astype(np.int64), images[:64], labels[:64], images[:64], labels[:64])

    compile_s, per_net_setup = 30.0, 0.5  # a pack's setup: one compile plus a build per net
    for k, P in enumerate(packs):
        remaining = len(packs) - k
        expected = compile_s + per_net_setup * P
        if time.perf_counter() + expected + 5 > deadline:
            emit(kind="cell", pack=P, path="pack vmap", skipped=f"budget (setup ~{expected:.0f} s)")
            continue
        t0 = time.perf_counter()
        try:
            pack = PackTrainer([config] * P, [data] * P, list(range(P)), TrainSettings())
            jax.block_until_ready(pack.step(rng.integers(0, n_images, (P, B)).astype(np.int32)))
        except Exception as error:  # XLA's out-of-memory error type differs between versions
            if "RESOURCE_EXHAUSTED" not in str(error) and "out of memory" not in str(error).lower():
                raise
            emit(kind="cell", pack=P, path="pack vmap", skipped="out of device memory")
            break
        setup = time.perf_counter() - t0
        if k == 0:
            compile_s = setup
        else:
            per_net_setup = max(per_net_setup, (setup - compile_s) / P)
        window = max(1.0, slice_left(remaining) - setup)
        n_steps, t = 0, time.perf_counter()
        while True:  # sync every 10 steps: dispatch runs ahead, as in training
            for _ in range(10):
                out = pack.step(rng.integers(0, n_images, (P, B)).astype(np.int32))
            jax.block_until_ready(out)
            n_steps += 10
            if time.perf_counter() - t > window:
                break
        ips = n_steps * P * B / (time.perf_counter() - t)
        memory = _peak_memory(jax)
        emit(
            kind="cell",
            pack=P,
            path="pack vmap",
            images_per_s=ips,
            setup_s=setup,
            steps=n_steps,
            peak_bytes=memory,
            **_nets_per_hour(args, P, ips, eval_per_image),
        )
        del pack
    emit(
        kind="imports",
        tensorflow="tensorflow" in sys.modules,
        mlflow="mlflow" in sys.modules,
        optuna="optuna" in sys.modules,
    )


def _check_device(args: argparse.Namespace) -> str:
    import keras

    if keras.backend.backend() == "jax":
        import jax

        platform = jax.default_backend()
        devices = ", ".join(d.device_kind for d in jax.devices())
    else:
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        platform, devices = ("gpu" if gpus else "cpu"), (", ".join(g.name for g in gpus) or "cpu")
    if args.device == "gpu" and platform != "gpu":
        print(f"--device gpu: {keras.backend.backend()} sees no GPU (platform {platform})", file=sys.stderr)
        sys.exit(2)
    return f"{platform}: {devices}"


def _peak_memory(jax: object) -> int | None:
    stats = jax.local_devices()[0].memory_stats() or {}  # None on CPU
    return stats.get("peak_bytes_in_use")


def epochs_per_net(args: argparse.Namespace) -> tuple[float, str]:
    """The epochs a net trains in the projection, and where that figure comes from."""
    if args.epochs_per_net:
        return args.epochs_per_net, "assumed (--epochs-per-net)"
    with open(args.epochs_from) as f:
        measured = json.load(f)
    s = measured["summary"]
    datasets = sorted({net["dataset"] for net in measured["nets"]})
    reached = [net["epochs_reached"] for net in measured.get("unfinished", [])]
    where = (
        f"measured: mean of {s['nets']} nets of campaign {measured['campaign']} "
        f"(median {s['median']:g}, range {s['min']}-{s['max']}; datasets {', '.join(datasets)})"
        + (f"; {len(reached)} more stopped unfinished after {reached} epochs" if reached else "")
    )
    return float(s["mean"]), where


def _nets_per_hour(args: argparse.Namespace, P: int, ips: float, eval_s_per_image: float) -> dict:
    """Nets of `epochs_per_net` epochs (plus the initialisation's evaluation): training at the
    measured rate, evaluation one net at a time."""
    epoch_s = args.train_images * P / ips + args.eval_images * P * eval_s_per_image
    return {"nets_per_hour": 3600 * P / ((args.epochs + 1) * epoch_s)}


# ---------------------------------------------------------------------------------- parent
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.epochs_per_net and not os.path.exists(args.epochs_from):
        print(f"--epochs-from: {args.epochs_from} does not exist (or give --epochs-per-net)", file=sys.stderr)
        return 2
    args.epochs, args.epochs_source = epochs_per_net(args)  # read once
    if args.child:
        child(args)
        return 0
    backends = ["jax", "tensorflow"] if args.backends == "auto" else args.backends.split(",")
    backends = [b for b in backends if installed(b)]
    if "jax" not in backends:
        print("jax is not installed", file=sys.stderr)
        return 2
    rows: list[dict] = []
    share = args.budget / len(backends)
    for b in backends:
        command = [
            sys.executable,
            os.path.abspath(__file__),
            *(argv or sys.argv[1:]),
            "--child",
            b,
            "--budget",
            str(share * (0.9 if b == "jax" else 0.8)),
        ]
        try:
            done = subprocess.run(command, stdout=subprocess.PIPE, text=True, timeout=share + 30, check=False)
            output, code = done.stdout, done.returncode
        except subprocess.TimeoutExpired as late:  # keep the cells it measured
            output, code = late.stdout or "", "a timeout"
            output = output.decode() if isinstance(output, bytes) else output
        rows += [json.loads(line) for line in output.splitlines() if line.startswith("{")]
        if code == 2:  # its one line (no GPU) is said already
            return 2
        if code:
            print(f"{b}: child ended with {code}", file=sys.stderr)
    _table(args, backends, rows)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    return 0


def _table(args: argparse.Namespace, backends: list[str], rows: list[dict]) -> None:
    for r in rows:
        if r["kind"] == "device":
            print(f"{r['backend']}: {r['device']}, keras {r['keras']}")
    print(
        f"fixed architecture, batch {args.batch}, augmentation {'on' if args.augment else 'off'}; nets/hour "
        f"for {args.epochs:.1f} epochs of {args.train_images} + {args.eval_images} images"
    )
    print(f"epochs per net: {args.epochs_source}")
    header = f"{'pack':>6} {'path':>12}" + "".join(f" | {b + ' img/s':>17} {'nets/h':>8}" for b in backends)
    print(header)
    cells = sorted(
        {(r["pack"], r["path"]) for r in rows if r["kind"] == "cell"},
        key=lambda c: (c[0], c[1] != "keras fit"),
    )
    for pack, path in cells:
        line = f"{pack:>6} {path:>12}"
        for b in backends:
            r = next(
                (
                    r
                    for r in rows
                    if r["kind"] == "cell" and r["backend"] == b and r["pack"] == pack and r["path"] == path
                ),
                None,
            )
            if r is None or "images_per_s" not in r:
                line += f" | {(r or {}).get('skipped', '-'):>26}"
            else:
                line += f" | {r['images_per_s']:>17.0f} {r['nets_per_hour']:>8.1f}"
        print(line)
    best = max((r for r in rows if r.get("nets_per_hour")), key=lambda r: r["nets_per_hour"], default=None)
    if best is not None:
        print(
            f"projected full NWS rebuild: {args.nets:,} nets x {args.epochs:.1f} epochs = "
            f"{args.nets / best['nets_per_hour']:,.1f} device-hours ({best['backend']}, {best['path']}, "
            f"pack {best['pack']}, {best['nets_per_hour']:.1f} nets/h)"
        )
    for r in rows:
        if r["kind"] == "imports" and r["backend"] == "jax":
            imported = ", ".join(f"{m} {r[m]}" for m in ("tensorflow", "mlflow", "optuna"))
            print(f"jax process imported: {imported}")
    if "tensorflow" not in backends:
        print("tensorflow: not installed here (its column needs a machine with TensorFlow)")
    elif any(r["backend"] == "tensorflow" for r in rows):
        print("tensorflow: packs need the JAX backend (pack > 1 is not implemented for TensorFlow)")


if __name__ == "__main__":
    sys.exit(main())
