"""The runs `train` logs once its input is checked (`nws.commands.train.plan`): one child run per
(property, model) that trains the model, evaluates it on the held-out nets, logs what it found and
registers it, and on the parent run one metric per (property, model), `selection.csv`,
`results.csv` and `results.png`."""

from __future__ import annotations

import io
import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from nws import interrupts
from nws.meta import KINDS
from nws.meta.base import MetaSettings, Task
from nws.progress import say
from nws.space import PROPERTY_NAMES
from nws.tracking.runs import parent_run
from nws.tracking.tags import TAG_ROLE
from nws.zoo.splits import Split
from nws.zoo.store import Zoo


@dataclass
class Plan:
    """Everything checked before training: the zoo, the K range and one split per property."""

    zoo: Zoo
    k_range: tuple[int, int]
    splits: dict[str, Split]
    models: list[str]
    layout: Any  # the shared architecture's layout, or None
    selection: str = ""  # the run query that selected the nets, as the registry records it


def selection_table(plan: Plan) -> pd.DataFrame:
    """Per selected net, its part (train, valid, test, unused) for every property."""
    table = plan.zoo.nets[["run_id", *PROPERTY_NAMES]].copy()
    for prop, split in plan.splits.items():
        part = np.full(len(table), "unused", dtype=object)
        part[split.train], part[split.valid], part[split.test] = "train", "valid", "test"
        table[f"split_{prop}"] = part
    return table


def train_all(plan: Plan, settings: MetaSettings, register: bool) -> pd.DataFrame:
    """Every (property, model) of the plan in its child run of the active run; the results table."""
    import mlflow

    mlflow.log_params({"n_nets": len(plan.zoo), "k_first": plan.k_range[0],
                       "k_last": plan.k_range[1]})  # fmt: skip
    mlflow.log_text(selection_table(plan).to_csv(index=False), "selection.csv")
    rows = []
    for prop, split in plan.splits.items():
        for name in plan.models:
            interrupts.check()  # a stop that a library swallowed on the way
            rows.append(train_one(plan, prop, split, name, settings, register))
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


def train_one(
    plan: Plan, prop: str, split: Split, name: str, settings: MetaSettings, register: bool
) -> dict[str, Any]:
    """Train, evaluate, log and (with `register`) register model `name` for `prop`: its row of
    the results table."""
    import mlflow

    from nws.meta import create
    from nws.meta.evaluation import confusion_png, evaluate
    from nws.meta.samples import Samples
    from nws.registry import log_meta_classifier

    zoo = plan.zoo
    task = Task(prop, split.classes)
    samples = {
        part: Samples.of(zoo, nets, split.labels, plan.k_range, settings.region, settings.slice_length)
        for part, nets in (("train", split.train), ("valid", split.valid), ("test", split.test))
    }
    say(f"{prop} / {name}: {len(split.train)} train, {len(split.valid)} valid, {len(split.test)} test nets")
    tags = {TAG_ROLE: "meta-classifier", "nws.property": prop, "nws.model": name}
    with parent_run(tags, run_name=f"{prop}-{name}", nested=True) as child:
        mlflow.log_params({
            "property": prop, "model": name, **{f"meta_{k}": v for k, v in asdict(settings).items()},
            "classes": ",".join(split.classes) or "regression", "k_first": plan.k_range[0],
            "k_last": plan.k_range[1], "n_train_nets": len(split.train),
            "n_valid_nets": len(split.valid), "n_test_nets": len(split.test),
        })  # fmt: skip
        model = create(name, task, settings, plan.layout)
        model.fit(samples["train"], samples["valid"])
        for key, values in model.history.items():
            for epoch, value in enumerate(values, start=1):
                mlflow.log_metric(f"train_{key}", value, step=epoch)
        result = evaluate(
            model, samples["test"], split.labels[split.train], settings.seed, label=f"{prop} / {name}"
        )
        mlflow.log_metrics(result.metrics)
        metric = "accuracy_by_snapshot" if not task.is_regression else "mae_by_snapshot"
        for k, value in result.by_snapshot.items():
            mlflow.log_metric(metric, value, step=int(k))
        mlflow.log_text(result.per_net.to_csv(index=False), "per_net.csv")
        if result.confusion is not None:
            mlflow.log_image(_image(confusion_png(result.confusion, split.classes, f"{prop} / {name}")),
                             "confusion.png")  # fmt: skip
        if result.sweep is not None:
            _log_sweep(result, samples["test"], task, plan, settings.region, f"{prop} / {name}")
        metric, value, higher_is_better = result.registry_metric
        about = version_tags(
            plan, prop, split, name, settings, result.metrics.get("chance"), child.info.run_id
        )
        registration = log_meta_classifier(
            model, register, value, metric, higher_is_better, about, version_description(about, metric, value)
        )
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


def version_tags(
    plan: Plan, prop: str, split: Split, name: str, settings: MetaSettings, chance: Any, run_id: str
) -> dict[str, str]:
    """What a registered version is: model type, property, chance, and how its nets were chosen."""
    chance_text = f"{chance:.4f}" if chance is not None and np.isfinite(chance) else "n/a (regression)"
    return {
        "nws.model": name,
        "nws.property": prop,
        "nws.chance": chance_text,
        "nws.selection": plan.selection,
        "nws.k": f"{plan.k_range[0]},{plan.k_range[1]}",
        "nws.slice_length": str(settings.slice_length)
        if KINDS[name].uses_slices
        else "n/a (whole snapshots)",
        "nws.region": settings.region,
        "nws.nets": f"{len(plan.zoo)} selected, {len(split.train)} train, {len(split.valid)} valid, "
        f"{len(split.test)} test",
        "nws.source_run": run_id,
    }


def version_description(about: dict[str, str], metric: str, value: float) -> str:
    """The version page's text: the same facts as the tags, in one paragraph."""
    return (
        f"{about['nws.model']} meta-classifier predicting {about['nws.property']} from a net's weights. "
        f"Held-out {metric} {value:.4f} (chance {about['nws.chance']}). Nets: {about['nws.nets']}, "
        f"selected by {about['nws.selection']}; snapshots K={about['nws.k']}, slice length "
        f"{about['nws.slice_length']}, region {about['nws.region']}. "
        f"Trained in run {about['nws.source_run']}."
    )


def _log_sweep(result: Any, test: Any, task: Task, plan: Plan, region: str, title: str) -> None:
    import mlflow

    from nws.meta.evaluation import sweep_accuracy, sweep_png

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "position_sweep.npy"
        np.save(path, result.sweep)
        mlflow.log_artifact(str(path))
    curve = sweep_accuracy(result, test.label)
    boundary = None
    if region == "all":
        zoo = plan.zoo
        boundary = float(np.mean(zoo.conv[test.net] / zoo.lengths[test.net]))
    chance = 1.0 / len(task.classes) if task.classes else float("nan")
    ylabel = "mean absolute error" if task.is_regression else "accuracy"
    mlflow.log_image(_image(sweep_png(curve, chance, boundary, title, ylabel)), "position_sweep.png")
    mlflow.log_text(json.dumps({"positions": len(curve), "curve": curve.tolist()}), "position_sweep.json")
