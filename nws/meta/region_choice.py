"""Which region of the weights a property is read from: `region=auto`.

Nets trained for a few epochs keep their initialisation in their kernels (~99 % of the weights)
and write how they were trained (optimizer, activation, batch size) in the small tensors: biases
and batch norm's parameters and moving statistics (benchmarks/signal_by_tensor.py). A slice model
(the DMC, `stats`) sees a property only where its slices come from, so `auto` asks, per property
and before any model is trained, where the training nets show it: a probe (gradient-boosted
trees on the statistics of random slices of each candidate region, the last snapshot in K)
is cross-validated on the training and validation nets alone, folds split by net, and the region
it scores best on is the one every slice model of the property is trained and evaluated on. Ties
go to `all`. Models of whole snapshots (`layer_stats`, `invariant`) see every tensor already: they keep `all`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nws.meta.features import slice_statistics
from nws.meta.samples import Samples
from nws.net.regions import REGIONS, region_size
from nws.net.snapshots import WeightLayout
from nws.zoo.store import Zoo

AUTO = "auto"
REGION_CHOICES = (*REGIONS, AUTO)


def widest_region(region: str) -> str:
    """The region every slice must fit in: `auto` may choose `all`, so `all`."""
    return "all" if region == AUTO else region


CANDIDATES = ("all", "nonkernel")
"""What `auto` chooses between, in order of preference on a tie."""
PROBE_NETS = 300  # the most training nets the probe reads (one snapshot each)
PROBE_SLICES = 16  # random slices per net, as `stats` (MetaSettings.stats_slices)
PROBE_FOLDS = 5
PROBE_TREES = 30  # boosting rounds: 100 scored the same on the default zoo at 2.5x the time


@dataclass(frozen=True)
class RegionChoice:
    """The region `auto` chose for one property, and each candidate's cross-validated probe score
    (accuracy, or minus the mean absolute error of a regression)."""

    region: str
    scores: dict[str, float]
    measure: str  # "accuracy" or "-MAE"

    def describe(self) -> str:
        if not self.scores:
            return f"region {self.region} (the only region every net has a slice of)"
        measured = ", ".join(f"{name} {score:.3g}" for name, score in self.scores.items())
        return f"region {self.region} (probe {self.measure}: {measured})"


def choose_region(
    zoo: Zoo,
    nets: np.ndarray,
    labels: np.ndarray,
    k: int,
    regression: bool,
    slice_length: int,
    layout: WeightLayout | None = None,
    seed: int = 0,
) -> RegionChoice:
    """The candidate region whose slices tell `labels` best on these (training) nets, among those
    every net has a slice of `slice_length` of and whose layout is known: per net,
    `PROBE_SLICES` random slices of snapshot k, their statistics (what `stats` reads), a probe
    (`probe_score`) cross-validated with the folds split by net. A lone candidate is chosen unprobed."""
    rng = np.random.default_rng(seed)
    nets = np.sort(rng.permutation(np.asarray(nets))[:PROBE_NETS])
    shapes = {(int(zoo.lengths[i]), int(zoo.conv[i])) for i in nets}
    candidates = []
    for region in CANDIDATES:
        try:
            if min(region_size(n, conv, region, layout) for n, conv in shapes) >= slice_length:
                candidates.append(region)
        except ValueError:  # a net whose layout is unknown
            continue
    measure = "-MAE" if regression else "accuracy"
    if len(candidates) < 2:
        return RegionChoice(candidates[0] if candidates else "all", {}, measure)
    scores = {}
    for region in candidates:
        samples = Samples.of(zoo, nets, labels, (k, k), region, slice_length, layout)
        index = np.repeat(np.arange(len(samples)), PROBE_SLICES)
        features = slice_statistics(samples.random_slices(index, np.random.default_rng([seed, 1])))
        scores[region] = probe_score(features, samples.label[index], samples.net[index], regression, seed)
    return RegionChoice(max(scores, key=lambda region: scores[region]), scores, measure)


def probe_score(
    features: np.ndarray, y: np.ndarray, groups: np.ndarray, regression: bool, seed: int
) -> float:
    """Cross-validated accuracy (or minus the mean absolute error) of gradient-boosted trees on
    the slices' statistics, each fold's nets held out whole (stratified by class). Trees, not a
    linear model: on the default zoo a logistic regression scored the optimizer and the batch size
    no better in the small tensors than in the whole vector (0.43 against 0.47, 0.18 against
    0.31), where the trees (0.63 against 0.49, 0.38 against 0.34) and the DMC read them
    (docs/meta-classifiers.md)."""
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
    from sklearn.model_selection import GroupKFold, StratifiedGroupKFold, cross_val_score

    features = np.nan_to_num(np.asarray(features, np.float64), posinf=0.0, neginf=0.0)
    n_nets = len(np.unique(groups))
    if regression:
        folds = GroupKFold(min(PROBE_FOLDS, n_nets))
        model = HistGradientBoostingRegressor(loss="absolute_error", max_iter=PROBE_TREES, random_state=seed)
        scoring = "neg_mean_absolute_error"
    else:
        per_class = np.bincount(np.asarray(y, np.int64)[np.unique(groups, return_index=True)[1]])
        rarest = int(per_class[per_class > 0].min())
        if rarest < 2 or len(per_class[per_class > 0]) < 2:
            return 0.0
        folds = StratifiedGroupKFold(min(PROBE_FOLDS, rarest), shuffle=True, random_state=seed)
        model = HistGradientBoostingClassifier(max_iter=PROBE_TREES, random_state=seed)
        scoring = "accuracy"
    return float(cross_val_score(model, features, y, groups=groups, cv=folds, scoring=scoring).mean())
