"""The DMC's training budget, measured: per-net accuracy on the same held-out nets against the
number of optimizer steps, beside the `stats` and `layer_stats` models of the same split.

It reads a zoo already in an MLflow store (by default the default `main`'s campaign, as `main`
leaves it) with `train`'s own selection, split and evaluation, and prints one row per (property,
model, steps): the per-net accuracy with its interval and p-value against chance, the slice
accuracy, the confusion over the test nets (true class: counts of each predicted class), the
steps the DMC took and the step of its best validation, and the fit's seconds. Nothing is logged to MLflow.

Run (after the default `mlflow run . --env-manager local --experiment-name nws`, same store):
    python benchmarks/dmc_steps.py --steps 30,300,1000 [--props initialization,optimizer]
        [--variants budget,paper,raw] [--set learning_rate=0.003,...] [--csv out.csv]
        [--region conv|fc|nonkernel|auto]
`--region nonkernel` cuts every model's slices from the tensors that are not kernels (biases,
batch norm) alone, where a briefly trained net keeps its optimizer, activation and batch size
(`signal_by_tensor.py`); `--small-tensors` is the same.
and the DMC's step time per backend (random batches in memory, no zoo needed), each backend in a
process of its own, side by side:
    python benchmarks/dmc_steps.py --step-time 512,5000 [--timed-steps 10]

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
    parser.add_argument("--set", default="", help="DMC settings changed in every variant: key=value,...")
    parser.add_argument("--paper-epochs", type=int, default=30)
    parser.add_argument("--K", default="4,4")
    parser.add_argument("--slice-length", type=int, default=512)
    parser.add_argument("--region", default="all", help="where every model's slices are cut (train's region)")
    parser.add_argument("--small-tensors", action="store_true", help="--region nonkernel (the earlier name)")
    parser.add_argument("--test-fraction", type=float, default=0.3)
    parser.add_argument("--baselines", default="stats,layer_stats")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--csv", default="")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: every core)")
    parser.add_argument("--step-time", default="", help="slice lengths: time the DMC's steps instead")
    parser.add_argument("--timed-steps", type=int, default=10)
    parser.add_argument("--backend", default="", help=argparse.SUPPRESS)  # one timing process
    args = parser.parse_args()
    if args.step_time:
        step_times(args)
        return

    import numpy as np
    import pandas as pd

    from nws import backend

    backend.configure(True, args.threads)
    from nws.commands.train import TrainOptions, plan
    from nws.meta import KINDS, create
    from nws.meta.base import Task
    from nws.meta.evaluation import evaluate
    from nws.meta.region_choice import choose_region
    from nws.meta.samples import Samples

    options = TrainOptions(
        experiment=args.experiment, filter=args.filter, props=args.props, K=args.K,
        slice_length=args.slice_length, region="nonkernel" if args.small_tensors else args.region,
        models="dmc," + args.baselines if args.baselines else "dmc",
        test_fraction=args.test_fraction, seed=args.seed, register=False,
    )  # fmt: skip
    work = plan(options)
    base = options.settings()
    set_by_hand = overrides(base, args.set)
    if set_by_hand:
        print(f"every DMC variant with {set_by_hand}", flush=True)
    rows = []

    def run(prop: str, split, name: str, settings, label: str, steps: int) -> None:
        samples = {
            part: Samples.of(
                work.zoo,
                nets,
                split.labels,
                work.k_range,
                settings.region,
                settings.slice_length,
                work.layout,
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
        row["slice_accuracy"] = round(result.metrics.get("slice_accuracy", float("nan")), 3)
        if result.confusion is not None:  # true class -> counts of predicted classes, over test nets
            pairs = zip(split.classes, result.confusion, strict=True)
            row["confusion"] = " ".join(f"{c}:{'/'.join(map(str, counts))}" for c, counts in pairs)
        rows.append(row)
        print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)

    for prop, split in work.splits.items():
        base = options.settings()
        if base.region == "auto":  # as train: the region the probe finds the property in
            nets = np.concatenate([split.train, split.valid])
            choice = choose_region(work.zoo, nets, split.labels, work.k_range[1], split.is_regression,
                                   base.slice_length, work.layout, base.seed)  # fmt: skip
            print(f"{prop}: slices from {choice.describe()}", flush=True)
            base = dataclasses.replace(base, region=choice.region)
        for name in [m for m in work.models if m != "dmc"]:
            settings = base if KINDS[name].uses_slices else dataclasses.replace(base, region="all")
            run(prop, split, name, settings, "-", 0)
        for variant in args.variants.split(","):
            change = VARIANTS[variant]
            budgets = [0] if variant == "paper" else [int(s) for s in args.steps.split(",")]
            for steps in budgets:
                changed = {"steps": steps, **change, **set_by_hand}
                settings = dataclasses.replace(base, **changed)
                if variant == "paper":
                    settings = dataclasses.replace(settings, epochs=args.paper_epochs)
                run(prop, split, "dmc", settings, variant, steps)
    table = pd.DataFrame(rows)
    print(table.to_string(index=False), file=sys.stdout)
    if args.csv:
        table.to_csv(args.csv, index=False)


def overrides(base, text: str) -> dict:
    """`key=value,...` as MetaSettings fields, each value of the field's own type."""
    changed = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        kind = type(getattr(base, key))
        changed[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    return changed


def step_times(args: argparse.Namespace) -> None:
    """Seconds per DMC training step at each slice length, per backend; in a child process per
    backend (a process has one Keras backend)."""
    import json
    import subprocess

    lengths = [int(x) for x in args.step_time.split(",")]
    if args.backend:
        print(json.dumps(time_steps(args.backend, lengths, args.timed_steps, args.threads)))
        return
    found = {}
    for name in ("tensorflow", "jax"):
        done = subprocess.run(
            [sys.executable, __file__, "--step-time", args.step_time, "--timed-steps", str(args.timed_steps),
             "--threads", str(args.threads), "--backend", name],
            env={**os.environ, "KERAS_BACKEND": name}, capture_output=True, text=True,
        )  # fmt: skip
        if done.returncode:
            sys.exit(f"{name}: {done.stderr.strip().splitlines()[-1]}")
        found[name] = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"DMC training step, batch 64, {args.timed_steps} steps after 3 of warm-up, threads {args.threads}")
    for length in lengths:
        tf_ms, jax_ms = (found[name][str(length)] * 1000 for name in ("tensorflow", "jax"))
        print(f"  L = {length:>5}: tensorflow {tf_ms:8.1f} ms/step   jax {jax_ms:8.1f} ms/step   "
              f"jax / tensorflow = {jax_ms / tf_ms:.2f}")  # fmt: skip


def time_steps(name: str, lengths: list[int], steps: int, threads: int) -> dict[str, float]:
    import numpy as np

    from nws import backend

    backend.select(name)
    backend.chosen().environment(True, threads)
    backend.configure(True, threads)
    import keras

    from nws.meta.dmc import build_dmc

    out = {}
    rng = np.random.default_rng(0)
    for length in lengths:
        backend.seed(0)
        model = build_dmc(length, 4)
        model.compile(optimizer=keras.optimizers.Adam(1e-3),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))  # fmt: skip
        x = rng.standard_normal((64 * (steps + 3), length), dtype=np.float32)
        y = rng.integers(0, 4, len(x))
        model.fit(backend.array_batches((x[: 64 * 3], y[: 64 * 3]), 64), epochs=1, verbose=0)
        start = time.perf_counter()
        model.fit(backend.array_batches((x[64 * 3 :], y[64 * 3 :]), 64), epochs=1, verbose=0)
        out[str(length)] = (time.perf_counter() - start) / steps
    return out


if __name__ == "__main__":
    main()
