"""Fidelity `paper` against `clean` on the same zoo: what the switch changes in the weights and in
what meta-classifiers read from them.

Samples the same campaign twice (same seed, so the same 13 properties and net seeds per trial),
once per fidelity: fixed architecture, offline datasets, small image caps, one snapshot per
evaluation (prints = max_epochs + 1, so K = 1 is the initialisation and K = prints the last
epoch; with --max-epochs 0, the initialisation alone). Then prints, side by side:

  1. a per-tensor summary at K = 1 and at the last K: mean |w| of every tensor kind per part
     (conv / fc), averaged over the nets; the batch-norm moving statistics as mean |moving mean|
     and mean moving variance;
  2. the meta-classifier table (per-net accuracy; for the learning rate the per-net MAE) of
     `nws.commands.train.run_training` at K = 1,1 and at K = last,last, for each fidelity.

With --timing-only it measures instead what one epoch costs under each fidelity: the fixed
architecture on `shapes` (500 / 300 images, batch 64, 5 epochs), with and without augmentation,
the fidelities alternating, twice each; it prints the time to the first evaluation and the
median epoch after it.

Everything goes to a temporary MLflow store (SQLite) and snapshot cache, removed at the end
unless --keep is given. Run: python benchmarks/fidelity_compare.py [--n-nets 24] [--max-epochs 5]
[--models stats,layer_stats,dmc] [--dmc-epochs 30]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

FIDELITIES = ("paper", "clean")
TENSORS = ("kernel", "bias", "beta", "gamma", "moving_mean", "moving_variance")


def campaign_name(fidelity: str) -> str:
    return f"fidelity-{fidelity}"


def sample(fidelity: str, args: argparse.Namespace, root: Path) -> float:
    from nws.commands.sample import SampleOptions, run_campaign

    options = SampleOptions(
        n_nets=args.n_nets,
        subset="fixed",
        datasets="offline",
        prints=max(2, args.max_epochs + 1),
        max_epochs=args.max_epochs,
        min_epochs=args.max_epochs,
        max_train_images=args.max_train_images,
        max_eval_images=args.max_eval_images,
        seed=args.seed,
        campaign=campaign_name(fidelity),
        storage=str(root / f"optuna-{fidelity}.log"),
        fidelity=fidelity,
    )
    started = time.perf_counter()
    summary = run_campaign(options)
    if summary.failed:
        print(f"{fidelity}: {len(summary.failed)} nets failed")
    return time.perf_counter() - started


def snapshots(fidelity: str, root: Path) -> list[tuple[object, object, object, dict]]:
    """(config, layout, weights [prints, n], final metrics) of every finished net of a fidelity's
    campaign, in trial order."""
    import mlflow
    import numpy as np

    from nws.net.snapshots import weight_layout
    from nws.space import PROPERTY_NAMES, NetConfig
    from nws.tracking.tags import TAG_CAMPAIGN, TAG_ROLE, TAG_TRIAL, WEIGHTS_ARTIFACT

    query = (
        f"tags.`{TAG_ROLE}` = 'net' and tags.`{TAG_CAMPAIGN}` = '{campaign_name(fidelity)}'"
        " and attributes.status = 'FINISHED'"
    )
    nets = []
    runs = mlflow.search_runs(search_all_experiments=True, filter_string=query, output_format="list")
    for run in sorted(runs, key=lambda r: int(r.data.tags[TAG_TRIAL])):
        config = NetConfig.from_mapping({k: run.data.params[k] for k in PROPERTY_NAMES})
        folder = str(root / "npy" / fidelity)
        path = mlflow.artifacts.download_artifacts(
            run_id=run.info.run_id, artifact_path=WEIGHTS_ARTIFACT, dst_path=folder
        )
        nets.append((config, weight_layout(config), np.load(path), run.data.metrics))
    return nets


def tensor_summary(nets: list, k: int) -> dict[tuple[str, str], float]:
    """Per (tensor kind, part): mean |w| (moving variance: its mean), averaged over nets."""
    import numpy as np

    values: dict[tuple[str, str], list[float]] = {}
    for _config, layout, weights, _metrics in nets:
        row = weights[k - 1]
        for entry in layout:
            value = row[entry.offset : entry.stop]
            figure = value.mean() if entry.tensor == "moving_variance" else np.abs(value).mean()
            values.setdefault((entry.tensor, entry.part), []).append(float(figure))
    return {key: float(np.mean(v)) for key, v in values.items()}


def print_tensor_table(summaries: dict[tuple[str, int], dict], ks: tuple[int, ...]) -> None:
    columns = [(f, k) for k in ks for f in FIDELITIES]
    print("\nPer-tensor summary, mean over nets (moving_variance: mean value; others: mean |w|)")
    print(f"{'tensor':<16} {'part':<5} " + " ".join(f"{f'{f} K={k}':>13}" for f, k in columns))
    for tensor in TENSORS:
        for part in ("conv", "fc"):
            key = (tensor, part)
            if key not in summaries[columns[0]]:
                continue
            cells = " ".join(f"{summaries[c][key]:13.5f}" for c in columns)
            print(f"{tensor:<16} {part:<5} {cells}")


def meta_table(fidelity: str, k: int, args: argparse.Namespace) -> object:
    from nws.commands.train import TrainOptions, run_training
    from nws.tracking.tags import TAG_CAMPAIGN

    options = TrainOptions(
        filter=f"tags.`{TAG_CAMPAIGN}` = '{campaign_name(fidelity)}'",
        K=f"{k},{k}",
        slice_length=args.slice_length,
        models=args.models,
        epochs=args.dmc_epochs,
        seed=args.seed,
        register=False,
    )
    return run_training(options)


def print_meta_table(tables: dict[tuple[str, int], object], ks: tuple[int, ...]) -> None:
    columns = [(f, k) for k in ks for f in FIDELITIES]
    first = tables[columns[0]]
    print("\nMeta-classifiers on held-out nets: per-net accuracy (lrate: per-net MAE; chance in brackets)")
    print(f"{'property':<15} {'model':<12} " + " ".join(f"{f'{f} K={k}':>13}" for f, k in columns))
    for row in first.itertuples():
        cells = []
        for column in columns:
            table = tables[column]
            match = table[(table["property"] == row.property) & (table["model"] == row.model)]
            if match.empty:
                cells.append(f"{'-':>13}")
                continue
            value = match.iloc[0]["net_mae" if row.property == "lrate" else "net_accuracy"]
            cells.append(f"{value:13.5f}" if row.property == "lrate" else f"{value:13.3f}")
        guess = f"({row.constant_guess_mae:.5f})" if row.property == "lrate" else f"({row.chance:.3f})"
        print(f"{row.property:<15} {row.model:<12} " + " ".join(cells) + f"  {guess}")


def epoch_times(repeats: int = 2) -> None:
    import numpy as np

    from nws.data import load_images, split_for_net
    from nws.net.training import TrainSettings, train_net
    from nws.space import NetConfig

    for augmentation in (1, 0):
        config = NetConfig.parse(f"shapes,0.002,64,1,{augmentation},0,0,2,5,3,2,8,128")
        for _ in range(repeats):
            for fidelity in FIDELITIES:
                data = split_for_net(load_images("shapes"), 1, 500, 300, fidelity=fidelity)
                result = train_net(
                    config, data, 1, TrainSettings(max_epochs=5, min_epochs=5, fidelity=fidelity)
                )
                elapsed = [h["elapsed_seconds"] for h in result.history]
                print(
                    f"augmentation {config.augmentation:<3} {fidelity:<5}: first evaluation after "
                    f"{elapsed[0]:.1f} s, median epoch {statistics.median(np.diff(elapsed)):.2f} s",
                    flush=True,
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-nets", type=int, default=24)
    parser.add_argument("--max-epochs", type=int, default=5)
    parser.add_argument("--max-train-images", type=int, default=500)
    parser.add_argument("--max-eval-images", type=int, default=300)
    parser.add_argument("--models", default="stats,layer_stats,dmc")
    parser.add_argument("--dmc-epochs", type=int, default=30)
    parser.add_argument("--slice-length", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the temporary store and print its path")
    parser.add_argument("--timing-only", action="store_true", help="only the epoch times of both fidelities")
    args = parser.parse_args()
    if args.timing_only:
        from nws.backend import configure_tensorflow

        configure_tensorflow(deterministic=True)
        print(f"{platform.node()}: {os.cpu_count()} CPUs")
        epoch_times()
        return

    root = Path(tempfile.mkdtemp(prefix="nws-fidelity-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    os.environ["NWS_CACHE_DIR"] = str(root / "cache")
    os.chdir(root)
    import mlflow

    from nws.net.training import configure_tensorflow

    configure_tensorflow(deterministic=True)
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    started = time.perf_counter()
    print(f"{platform.node()}: {os.cpu_count()} CPUs, {args}")
    try:
        seconds = {f: sample(f, args, root) for f in FIDELITIES}
        for fidelity, s in seconds.items():
            print(f"sampled {args.n_nets} nets under {fidelity} in {s:.0f} s")
        ks = (1, args.max_epochs + 1) if args.max_epochs else (1,)  # max_epochs 0: the initialisation only
        nets = {f: snapshots(f, root) for f in FIDELITIES}
        for fidelity in FIDELITIES:
            metrics = [net[3] for net in nets[fidelity]]
            print(
                f"{fidelity}: {len(metrics)} nets, median train_seconds "
                f"{statistics.median(m['train_seconds'] for m in metrics):.1f}, mean final test accuracy "
                f"{statistics.mean(m['test_accuracy'] for m in metrics):.3f}"
            )
        summaries = {(f, k): tensor_summary(nets[f], k) for f in FIDELITIES for k in ks}
        tables = {}
        for fidelity in FIDELITIES:
            for k in ks:
                meta_started = time.perf_counter()
                tables[(fidelity, k)] = meta_table(fidelity, k, args)
                print(f"meta-classifiers for {fidelity} K={k}: {time.perf_counter() - meta_started:.0f} s")
        print_tensor_table(summaries, ks)
        print_meta_table(tables, ks)
        print(f"\ntotal {time.perf_counter() - started:.0f} s")
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
