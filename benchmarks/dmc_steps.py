"""The DMC's training budget, measured: per-net accuracy on the same held-out nets against the
number of optimizer steps, beside the `stats` and `layer_stats` models of the same split.

It reads a zoo already in an MLflow store (by default the default `main`'s campaign, as `main`
leaves it) with `train`'s own selection, split and evaluation, and prints one row per (property,
model, steps): the per-net accuracy with its interval and p-value against chance, the steps the
DMC took and the step of its best validation, and the fit's seconds. Nothing is logged to MLflow.

Run (after the default `mlflow run . --env-manager local --experiment-name nws`, same store):
    python benchmarks/dmc_steps.py --steps 30,300,3000 [--props initialization,optimizer]
        [--variants budget,paper,raw] [--csv out.csv]

Variants: `budget` (the defaults: steps, cosine rate, best validation, inputs scaled), `raw`
(the same without input scaling), `paper` (steps=0: `--paper-epochs` passes over the training
samples at a constant rate, the last weights, raw inputs: the paper's schedule).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

VARIANTS = {
    "budget": {},
    "raw": {"normalize": False},
    "paper": {"steps": 0, "normalize": False},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="nws")
    parser.add_argument("--filter", default="tags.`nws.campaign` = 'main'")
    parser.add_argument("--props", default="initialization,optimizer,activation,batch_size")
    parser.add_argument("--steps", default="30,300,3000")
    parser.add_argument("--variants", default="budget")
    parser.add_argument("--paper-epochs", type=int, default=30)
    parser.add_argument("--K", default="4,4")
    parser.add_argument("--slice-length", type=int, default=512)
    parser.add_argument("--test-fraction", type=float, default=0.3)
    parser.add_argument("--baselines", default="stats,layer_stats")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--csv", default="")
    args = parser.parse_args()

    import pandas as pd

    from nws import backend

    backend.configure(True, 1)
    from nws.commands.train import TrainOptions, plan
    from nws.meta import create
    from nws.meta.base import Task
    from nws.meta.evaluation import evaluate
    from nws.meta.samples import Samples

    options = TrainOptions(
        experiment=args.experiment, filter=args.filter, props=args.props, K=args.K,
        slice_length=args.slice_length, models="dmc," + args.baselines if args.baselines else "dmc",
        test_fraction=args.test_fraction, seed=args.seed, register=False,
    )  # fmt: skip
    work = plan(options)
    base = options.settings()
    rows = []

    def run(prop: str, split, name: str, settings, label: str, steps: int) -> None:
        samples = {
            part: Samples.of(
                work.zoo, nets, split.labels, work.k_range, settings.region, settings.slice_length
            )
            for part, nets in (("train", split.train), ("valid", split.valid), ("test", split.test))
        }
        model = create(name, Task(prop, split.classes), settings, work.layout)
        start = time.perf_counter()
        model.fit(samples["train"], samples["valid"])
        seconds = time.perf_counter() - start
        result = evaluate(model, samples["test"], split.labels[split.train], settings.seed, sweep=False)
        stats = result.statistics
        row = {"property": prop, "model": name, "variant": label, "steps": steps,
               "train_nets": len(split.train), "valid_nets": len(split.valid), "test_nets": stats.n,
               "score": round(stats.estimate, 3), "ci_low": round(stats.ci_low, 3),
               "ci_high": round(stats.ci_high, 3), "baseline": round(stats.baseline, 3),
               "pvalue": float(f"{stats.pvalue:.2g}"),
               "steps_taken": int(model.fit_metrics.get("dmc_steps", 0)),
               "best_step": int(model.fit_metrics.get("dmc_best_step", 0)),
               "final_loss": round(model.history["loss"][-1], 3) if model.history.get("loss") else None,
               "fit_s": round(seconds, 1)}  # fmt: skip
        rows.append(row)
        print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)

    for prop, split in work.splits.items():
        for name in [m for m in work.models if m != "dmc"]:
            run(prop, split, name, base, "-", 0)
        for variant in args.variants.split(","):
            change = VARIANTS[variant]
            budgets = [0] if variant == "paper" else [int(s) for s in args.steps.split(",")]
            for steps in budgets:
                settings = dataclasses.replace(base, **{"steps": steps, **change})
                if variant == "paper":
                    settings = dataclasses.replace(settings, epochs=args.paper_epochs)
                run(prop, split, "dmc", settings, variant, steps)
    table = pd.DataFrame(rows)
    print(table.to_string(index=False), file=sys.stdout)
    if args.csv:
        table.to_csv(args.csv, index=False)


if __name__ == "__main__":
    main()
