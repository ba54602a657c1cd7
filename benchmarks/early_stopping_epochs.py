"""How many epochs our early stopping lets a net train: the epoch counts of a campaign's finished
nets, written to a JSON file that `benchmarks/pack_throughput.py` projects a rebuild from (that
script runs where MLflow may be missing; this one reads the tracking store).

Run (the committed file `benchmarks/data/early_stopping_epochs.json` was made this way, by two
such `sample` processes on one campaign, `--n-nets 16` and `--n-nets 8`, stopped after an hour):
    nws sample --campaign early-stopping --n-nets 16 --subset main \
        --datasets mnist5k,shapes,gratings --workers 1 --threads 1
    python benchmarks/early_stopping_epochs.py --campaign early-stopping
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

DEFAULT_OUT = Path(__file__).parent / "data" / "early_stopping_epochs.json"
PARAMS = (
    "dataset",
    "batch_size",
    "optimizer",
    "n_train",
    "train_fidelity",
    "train_min_epochs",
    "train_max_epochs",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--campaign", required=True, help="the campaign whose finished nets are counted")
    p.add_argument("--tracking-uri", default="", help="default: MLFLOW_TRACKING_URI or ./mlruns")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    return p.parse_args(argv)


def summary(epochs: list[int]) -> dict[str, float]:
    ordered = sorted(epochs)
    return {
        "nets": len(ordered),
        "mean": statistics.fmean(ordered),
        "median": statistics.median(ordered),
        "min": ordered[0],
        "max": ordered[-1],
        "p90": ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import mlflow

    from nws.tracking.tags import TAG_CAMPAIGN, TAG_ROLE, TAG_STOP_REASON, tag_equals

    if args.tracking_uri:
        mlflow.set_tracking_uri(args.tracking_uri)
    every = mlflow.search_runs(
        search_all_experiments=True,
        output_format="list",
        filter_string=f"{tag_equals(TAG_ROLE, 'net')} and {tag_equals(TAG_CAMPAIGN, args.campaign)}",
    )
    runs = [run for run in every if run.info.status == "FINISHED"]
    if not runs:
        print(f"campaign {args.campaign}: no finished nets", file=sys.stderr)
        return 2
    nets = [
        {
            "epochs": int(run.data.metrics["epochs"]),
            "stop_reason": run.data.tags.get(TAG_STOP_REASON, ""),
            "steps_per_epoch": int(run.data.metrics["steps_per_epoch"]),
            **{name: run.data.params.get(name, "") for name in PARAMS},
        }
        for run in runs
    ]
    client = mlflow.MlflowClient()
    unfinished = [  # stopped (or still training) before early stopping ended them: lower bounds
        {
            "epochs_reached": max(
                m.step for m in client.get_metric_history(run.info.run_id, "valid_accuracy")
            ),
            "status": run.info.status,
            "dataset": run.data.params.get("dataset", ""),
        }
        for run in every
        if run.info.status != "FINISHED" and run.data.metrics.get("valid_accuracy") is not None
    ]
    document = {
        "campaign": args.campaign,
        "made_by": "python benchmarks/early_stopping_epochs.py --campaign " + args.campaign,
        "summary": summary([net["epochs"] for net in nets]),
        "nets": sorted(nets, key=lambda net: (net["dataset"], net["epochs"])),
        "unfinished": sorted(unfinished, key=lambda net: net["epochs_reached"]),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(document, indent=1) + "\n")
    s = document["summary"]
    print(
        f"{s['nets']} nets: epochs mean {s['mean']:.1f}, median {s['median']:g}, "
        f"range {s['min']}-{s['max']}, p90 {s['p90']}; {len(unfinished)} unfinished "
        f"(epochs reached: {[n['epochs_reached'] for n in document['unfinished']]}) -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
