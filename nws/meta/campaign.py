"""A meta-classifier campaign (the `train` entry point): select nets by run query, build the zoo,
train every requested model on every property that varies, evaluate on held-out nets, log one
child run per (property, model), register the models and move the `champion` alias.

Everything that can be wrong with the input (the query, K, the slice length, a property with one
class, a corrupted artifact) is checked before the first model is trained, so bad input never
registers anything.
"""

from __future__ import annotations

import io
import json
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from nws import interrupts
from nws.checks import at_least, writable_directory
from nws.commands.options import param
from nws.errors import ParameterError
from nws.meta.models import MODEL_NAMES, MetaSettings, Task
from nws.space import PROPERTY_NAMES, get_property
from nws.tracking import runs
from nws.tracking import tags as tracking
from nws.zoo import REGIONS, SPLITS, Selection, Split, default_cache_dir

TAG_META_ROLE = "meta"


@dataclass(frozen=True)
class TrainOptions(Selection):
    """The parameters of the `train` entry point: the selection, then the training."""

    props: str = param("all", "comma list of properties to predict, or all")
    K: str = param("", "snapshot range a,b within 1..prints (default: every snapshot)")
    slice_length: int = param(5000, "consecutive weights per input slice")
    region: str = param("all", "where slices start: all, conv or fc")
    models: str = param("dmc,stats,layer_stats", "meta-classifiers: dmc, stats, layer_stats")
    epochs: int = param(50, "DMC training epochs")
    batch_size: int = param(64, "DMC batch size")
    learning_rate: float = param(0.001, "DMC learning rate (Adam)")
    test_fraction: float = param(0.2, "share of each class's nets held out for testing")
    split: str = param("random", "random (by net, seeded) or published (the nets' nws.split tags)")
    seed: int = param(0, "seed of the split and the training")
    register: bool = param(True, "register the models and move the champion alias")
    cache_dir: str = param("", "snapshot cache (default $NWS_CACHE_DIR or ~/.cache/nws/zoo)")

    def validate(self) -> tuple[list[str], list[str]]:
        """Check the parameters that need no data; return the properties and models."""
        at_least("epochs", self.epochs, 1)
        at_least("batch_size", self.batch_size, 1)
        at_least("seed", self.seed, 0)
        if not 0.0 < self.test_fraction < 1.0:
            raise ParameterError("test_fraction", f"{self.test_fraction} is not in (0, 1)")
        if not self.learning_rate > 0:
            raise ParameterError("learning_rate", f"{self.learning_rate} is not positive")
        if not 0.0 <= self.min_test_accuracy <= 1.0:
            raise ParameterError("min_test_accuracy", f"{self.min_test_accuracy} is not in [0, 1]")
        if self.split not in SPLITS:
            raise ParameterError("split", f"{self.split!r} is not one of {', '.join(SPLITS)}")
        if self.region not in REGIONS:
            raise ParameterError("region", f"{self.region!r} is not one of {', '.join(REGIONS)}")
        at_least("slice_length", self.slice_length, 1)
        models = _names(self.models)
        for name in models:
            if name not in MODEL_NAMES:
                raise ParameterError("models", f"unknown model {name!r} (known: {', '.join(MODEL_NAMES)})")
        if not models:
            raise ParameterError("models", "no model given")
        props = list(PROPERTY_NAMES) if self.props.strip() in ("", "all") else _names(self.props)
        for name in props:
            try:
                get_property(name)
            except ParameterError:
                raise ParameterError(
                    "props", f"unknown property {name!r} (known: {', '.join(PROPERTY_NAMES)}, all)"
                ) from None
        writable_directory("cache_dir", self.cache_dir or default_cache_dir())
        return props, models

    def settings(self) -> MetaSettings:
        return MetaSettings(
            slice_length=self.slice_length,
            region=self.region,
            epochs=self.epochs,
            batch_size=self.batch_size,
            learning_rate=self.learning_rate,
            seed=self.seed,
        )


def _names(text: str) -> list[str]:
    return list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))


def say(text: str) -> None:
    print(text, file=sys.stdout, flush=True)


@dataclass
class Plan:
    """Everything checked before training: the zoo, the K range and one split per property."""

    zoo: Any
    k_range: tuple[int, int]
    splits: dict[str, Split]
    models: list[str]
    layout: Any  # the shared architecture's layout, or None


def plan(options: TrainOptions) -> Plan:
    from nws.snapshots import weight_layout
    from nws.space import NetConfig
    from nws.zoo import (
        ArtifactCache,
        build_zoo,
        check_slice_length,
        parse_k,
        query_nets,
        split_nets,
        varying_properties,
    )

    props, models = options.validate()
    nets = query_nets(options)
    say(f"selected {len(nets)} nets")
    explicit = options.props.strip() not in ("", "all")
    varying, constant = varying_properties(nets, props)
    if constant:
        message = ", ".join(f"{p} (always {nets[p].iloc[0]})" for p in constant)
        if explicit:
            raise ParameterError("props", f"does not vary in the selection: {message}")
        say(f"skipping properties that do not vary: {message}")
    if not varying:
        raise ParameterError("props", "no requested property varies in the selection")
    k_range = parse_k(options.K, int(nets["prints"].min()))
    splits = {}
    for prop in varying:
        try:
            splits[prop] = split_nets(
                nets, prop, options.test_fraction, options.seed, published=options.split == "published"
            )
        except ParameterError as reason:
            if explicit:
                raise
            say(f"skipping {prop}: {str(reason).removeprefix('props: ')}")
    if not splits:
        raise ParameterError("props", "no property has enough nets per class (2) in the selection")
    layout = None
    if "layer_stats" in models:
        if nets["n_weights"].nunique() == 1:
            layout = weight_layout(NetConfig.from_mapping(nets.iloc[0][list(PROPERTY_NAMES)].to_dict()))
        else:
            say("skipping layer_stats: the selected nets do not share one architecture")
            models = [m for m in models if m != "layer_stats"]
            if not models:
                raise ParameterError("models", "layer_stats needs nets of one architecture")
    cache = ArtifactCache(Path(options.cache_dir).expanduser() if options.cache_dir else None)
    used = np.unique(np.concatenate([np.concatenate([s.train, s.valid, s.test]) for s in splits.values()]))
    if any(m != "layer_stats" for m in models):
        check_slice_length(nets, used, options.region, options.slice_length)
    zoo = build_zoo(nets, cache)
    stats = cache.stats
    how = f"{stats.verified} verified against their digests, {stats.downloaded} downloaded"
    if stats.repaired:
        how += f", {stats.repaired} damaged cache entries rebuilt"
    say(f"zoo: {len(zoo)} nets, {zoo.size_bytes / 1e6:.1f} MB ({how})")
    return Plan(zoo, k_range, splits, models, layout)


def selection_table(plan: Plan) -> pd.DataFrame:
    """Per selected net, its part (train, valid, test, unused) for every property."""
    table = plan.zoo.nets[["run_id", *PROPERTY_NAMES]].copy()
    for prop, split in plan.splits.items():
        part = np.full(len(table), "unused", dtype=object)
        part[split.train], part[split.valid], part[split.test] = "train", "valid", "test"
        table[f"split_{prop}"] = part
    return table


def run_training(options: TrainOptions) -> pd.DataFrame:
    """Train, evaluate, log and register; return the results table."""
    the_plan = plan(options)
    with runs.parent_run({tracking.TAG_ROLE: TAG_META_ROLE}, asdict(options), run_name="meta-classifiers"):
        return _train_all(the_plan, options)


def _train_all(the_plan: Plan, options: TrainOptions) -> pd.DataFrame:
    import mlflow

    mlflow.log_params({"n_nets": len(the_plan.zoo), "k_first": the_plan.k_range[0],
                       "k_last": the_plan.k_range[1]})  # fmt: skip
    mlflow.log_text(selection_table(the_plan).to_csv(index=False), "selection.csv")
    rows = []
    for prop, split in the_plan.splits.items():
        for name in the_plan.models:
            interrupts.check()  # a stop that a library swallowed on the way
            rows.append(train_one(the_plan, prop, split, name, options))
            _log_parent_metrics(rows[-1])
    table = pd.DataFrame(rows)
    mlflow.log_text(table.to_csv(index=False), "results.csv")
    from nws.meta.evaluation import results_png

    if table["chance"].notna().any():
        mlflow.log_image(_image(results_png(table)), "results.png")
    return table


def _image(png: bytes) -> Any:
    from PIL import Image

    return Image.open(io.BytesIO(png))


def _log_parent_metrics(row: dict[str, Any]) -> None:
    import mlflow

    prop, model = row["property"], row["model"]
    if prop == "lrate":
        mlflow.log_metrics({f"mae_lrate_{model}": row["slice_mae"], f"netmae_lrate_{model}": row["net_mae"],
                            "mae_lrate_constant": row["constant_guess_mae"]})  # fmt: skip
    else:
        mlflow.log_metrics({f"acc_{prop}_{model}": row["slice_accuracy"],
                            f"netacc_{prop}_{model}": row["net_accuracy"],
                            f"chance_{prop}": row["chance"]})  # fmt: skip


def train_one(the_plan: Plan, prop: str, split: Split, name: str, options: TrainOptions) -> dict[str, Any]:
    import mlflow

    from nws.meta.evaluation import confusion_png, evaluate
    from nws.meta.models import create
    from nws.meta.samples import Samples
    from nws.registry import log_meta_classifier

    zoo, settings = the_plan.zoo, options.settings()
    task = Task(prop, split.classes)
    samples = {
        part: Samples.of(zoo, nets, split.labels, the_plan.k_range, options.region, options.slice_length)
        for part, nets in (("train", split.train), ("valid", split.valid), ("test", split.test))
    }
    say(f"{prop} / {name}: {len(split.train)} train, {len(split.valid)} valid, {len(split.test)} test nets")
    tags = {tracking.TAG_ROLE: "meta-classifier", "nws.property": prop, "nws.model": name}
    with runs.parent_run(tags, run_name=f"{prop}-{name}", nested=True) as child:
        mlflow.log_params({
            "property": prop, "model": name, **{f"meta_{k}": v for k, v in asdict(settings).items()},
            "classes": ",".join(split.classes) or "regression", "k_first": the_plan.k_range[0],
            "k_last": the_plan.k_range[1], "n_train_nets": len(split.train),
            "n_valid_nets": len(split.valid), "n_test_nets": len(split.test),
        })  # fmt: skip
        model = create(name, task, settings, the_plan.layout)
        model.fit(samples["train"], samples["valid"])
        for key, values in model.history.items():
            for epoch, value in enumerate(values, start=1):
                mlflow.log_metric(f"train_{key}", value, step=epoch)
        result = evaluate(model, samples["test"], split.labels[split.train], options.seed)
        mlflow.log_metrics(result.metrics)
        metric = "accuracy_by_snapshot" if not task.is_regression else "mae_by_snapshot"
        for k, value in result.by_snapshot.items():
            mlflow.log_metric(metric, value, step=int(k))
        mlflow.log_text(result.per_net.to_csv(index=False), "per_net.csv")
        if result.confusion is not None:
            mlflow.log_image(_image(confusion_png(result.confusion, split.classes, f"{prop} / {name}")),
                             "confusion.png")  # fmt: skip
        if result.sweep is not None:
            _log_sweep(result, samples["test"], task, the_plan, options, f"{prop} / {name}")
        metric, value, higher_is_better = result.registry_metric
        registration = log_meta_classifier(model, options.register, value, metric, higher_is_better)
        row = {"property": prop, "model": name, "run_id": child.info.run_id, **result.metrics,
               "chance": result.metrics.get("chance", np.nan), "n_train_nets": len(split.train),
               "n_test_nets": len(split.test)}  # fmt: skip
        if registration:
            mlflow.set_tags({"nws.registered_model": registration.name,
                             "nws.registered_version": registration.version,
                             "nws.champion": str(registration.champion)})  # fmt: skip
            row.update(
                registered=f"{registration.name} v{registration.version}",
                champion=registration.champion,
                comparison=registration.comparison,
            )
            say(f"  registered {registration.name} v{registration.version}: {registration.comparison}")
    return row


def _log_sweep(result: Any, test: Any, task: Task, the_plan: Plan, options: TrainOptions, title: str) -> None:
    import mlflow

    from nws.meta.evaluation import sweep_accuracy, sweep_png

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "position_sweep.npy"
        np.save(path, result.sweep)
        mlflow.log_artifact(str(path))
    curve = sweep_accuracy(result, test.label)
    boundary = None
    if options.region == "all":
        zoo = the_plan.zoo
        boundary = float(np.mean(zoo.conv[test.net] / zoo.lengths[test.net]))
    chance = 1.0 / len(task.classes) if task.classes else float("nan")
    ylabel = "mean absolute error" if task.is_regression else "accuracy"
    mlflow.log_image(_image(sweep_png(curve, chance, boundary, title, ylabel)), "position_sweep.png")
    mlflow.log_text(json.dumps({"positions": len(curve), "curve": curve.tolist()}), "position_sweep.json")


def format_table(table: pd.DataFrame) -> str:
    """The accuracy table against chance, as printed at the end."""
    lines = [f"{'property':<15} {'model':<12} {'net acc':>8} {'slice acc':>9} {'chance':>7}"]
    for row in table.itertuples():
        if row.property == "lrate":
            lines.append(f"{row.property:<15} {row.model:<12} MAE {row.net_mae:.5f} (constant guess "
                         f"{row.constant_guess_mae:.5f})")  # fmt: skip
        else:
            lines.append(f"{row.property:<15} {row.model:<12} {row.net_accuracy:8.3f} "
                         f"{row.slice_accuracy:9.3f} {row.chance:7.3f}")  # fmt: skip
    return "\n".join(lines)
