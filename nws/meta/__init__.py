"""Meta-classifiers: predict a net's hyper-parameters from its weights.

- `base`: the task, the settings and the interface every model shares;
- `dmc` (the paper's deep 1D CNN on raw slices), `baselines` (`stats`: slice statistics +
  gradient boosting; `layer_stats`: per-layer statistics of whole snapshots + gradient boosting,
  for selections that share one architecture), `invariant` (a DeepSets-style network over the
  units of every layer, unchanged when hidden units are renumbered; any architectures): the models;
- `unit_features`, `keras_archive`: what the invariant model pools; reading a `.keras` archive
  without running code from it;
- `features`, `samples`: weight statistics, and the slices cut from a zoo's snapshots;
- `evaluation`, `statistics`, `dissection`: held-out scores, their intervals and tests, figures.

This package's face makes and loads a model by its name (`create`, `load`): the factory lives
here, above the models, so that no model module imports it back.

A saved model is data only: `meta.json` and the estimator's file, in formats whose loading runs no
code from the file (skops with a trusted-type list, a `.keras` archive checked against the
objects a DMC holds and read in Keras' safe mode). A registered model's data can be replaced by
whoever may write the artifact store, so loading refuses anything else with one line.
"""

from __future__ import annotations

import json
from pathlib import Path

from nws.errors import DataError, one_line
from nws.meta.base import MetaClassifier, MetaSettings, Task
from nws.meta.baselines import LayerStatsModel, SliceStatsModel
from nws.meta.dmc import DMC
from nws.meta.invariant import InvariantModel
from nws.net.snapshots import WeightLayout

KINDS: dict[str, type[MetaClassifier]] = {
    "dmc": DMC,
    "stats": SliceStatsModel,
    "layer_stats": LayerStatsModel,
    "invariant": InvariantModel,
}
MODEL_NAMES = tuple(KINDS)


def create(
    name: str, task: Task, settings: MetaSettings, layout: WeightLayout | None = None
) -> MetaClassifier:
    """A new, unfitted model of kind `name` (one of MODEL_NAMES)."""
    return KINDS[name](task, settings, layout)


def load(directory: Path) -> MetaClassifier:
    """Read what `MetaClassifier.save` wrote; a file that is not what it wrote is a DataError
    (one line)."""
    directory = Path(directory)
    try:
        meta = json.loads((directory / "meta.json").read_text(encoding="utf-8"))
        task = Task(meta["task"]["prop"], tuple(meta["task"]["classes"]))
        layout = WeightLayout.from_records(meta["layout"]) if meta["layout"] else None
        model = create(meta["model"], task, MetaSettings(**meta["settings"]), layout)
    except (OSError, ValueError, KeyError, TypeError) as e:  # incl. UnicodeDecodeError, bad JSON
        raise DataError(f"meta.json: not a saved meta-classifier's description ({one_line(e)})") from None
    model._load_model(directory)
    return model
