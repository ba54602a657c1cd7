"""Where in a net's weights a property is written: per kind of tensor (conv and dense kernels,
biases, batch norm's beta, gamma and moving statistics), how well that kind alone tells each
property, beside the share of the weights it holds and how often a DMC slice touches it.

Each row trains a logistic regression (scikit-learn) on `layer_stats`' statistics of the listed
tensors of one snapshot per net, on `train`'s own split of the nets (training and validation nets
fit it, the test nets score it), and prints the per-net accuracy with its p-value against chance.
It explains what a slice model can read: a property written only in the small tensors is out of
reach of slices that almost never contain them.

Run (after the default `mlflow run . --env-manager local --experiment-name nws`, same store):
    python benchmarks/signal_by_tensor.py [--props optimizer,activation] [--K 4,4] [--csv out.csv]
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


PROPS = "initialization,optimizer,activation,batch_size,dataset,augmentation"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="nws")
    parser.add_argument("--filter", default="tags.`nws.campaign` = 'main'")
    parser.add_argument(
        "--props", default="initialization,optimizer,activation,batch_size,dataset,augmentation"
    )
    parser.add_argument("--K", default="4,4", help="the snapshot read (its last one): a,b as train's K")
    parser.add_argument(
        "--slice-length", type=int, default=512, help="for the share of slices touching a kind"
    )
    parser.add_argument("--test-fraction", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--csv", default="")
    args = parser.parse_args()

    import numpy as np
    import pandas as pd
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from nws.commands.train import TrainOptions, plan
    from nws.meta.features import LAYER_FEATURES, layer_statistics
    from nws.meta.statistics import accuracy_statistics

    options = TrainOptions(
        experiment=args.experiment, filter=args.filter, props=args.props, K=args.K, models="layer_stats",
        slice_length=args.slice_length, test_fraction=args.test_fraction, seed=args.seed, register=False,
    )  # fmt: skip
    work = plan(options)
    if work.layout is None:
        sys.exit("the selected nets do not share one architecture")
    layout, zoo, k = work.layout, work.zoo, work.k_range[1]
    kinds = {"kernels": [e for e in layout if e.is_kernel],
             "not kernels": [e for e in layout if not e.is_kernel]}  # fmt: skip
    for tensor in dict.fromkeys(e.tensor for e in layout if not e.is_kernel):
        kinds[tensor] = [e for e in layout if e.tensor == tensor]
    n, length = layout.n_weights, args.slice_length
    starts = np.arange(n - length + 1)
    print(f"{len(zoo)} nets of {n} weights, snapshot {k}; a slice of {length} at a uniform start")
    rows = []
    for kind, entries in kinds.items():
        weights = sum(e.size for e in entries)
        touched = np.zeros(len(starts), bool)
        for e in entries:  # slices [s, s + length) that overlap [offset, stop)
            touched |= (starts < e.stop) & (starts + length > e.offset)
        rows.append({"kind": kind, "weights": weights, "share": round(weights / n, 4),
                     "slices_touching": round(float(touched.mean()), 3)})  # fmt: skip
    table = pd.DataFrame(rows).set_index("kind")
    # Each net's snapshot read once, its statistics per kind computed once, for every property.
    features = {kind: np.empty((len(zoo), len(entries) * len(LAYER_FEATURES)), np.float32)
                for kind, entries in kinds.items()}  # fmt: skip
    for net in range(len(zoo)):
        vector = zoo.snapshot(net, k)
        for kind, entries in kinds.items():
            features[kind][net] = layer_statistics(vector, entries)[0]
    for prop, split in work.splits.items():
        if split.is_regression:
            continue
        labels = split.labels if split.labels.ndim == 1 else split.labels[:, k - 1]
        fit_nets = np.concatenate([split.train, split.valid])
        column = []
        for kind in kinds:
            model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
            model.fit(features[kind][fit_nets], labels[fit_nets])
            right = model.predict(features[kind][split.test]) == labels[split.test]
            stats = accuracy_statistics(right, split.chance)
            column.append(f"{stats.estimate:.2f}{'*' if stats.significant else ''}")
        table[f"{prop} ({len(split.test)}, chance {split.chance:.2f})"] = column
    pd.set_option("display.width", 250)
    print(table.to_string())
    print("per-net accuracy of a logistic regression on the kind's layer statistics; * p < 0.01")
    if args.csv:
        table.to_csv(args.csv)


if __name__ == "__main__":
    main()
