"""The runs `train` logs once its input is checked (`nws.commands.train.plan`): one child run per
(property, model) that trains the model, evaluates it on the held-out nets, logs what it found and
its statistics, and registers it; one more child run per (property, slice model) for each length
of the how-much sweep (tagged `nws.slice_length`, not registered); and on the parent run the
metrics of every (property, model), `selection.csv`, `results.csv`, `results.png`,
`dissection.png` and `dissection.md`. The dissection reuses the evaluations: nothing is retrained."""

from __future__ import annotations

import io
import json
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from nws import interrupts
from nws.backend import TAG_BACKEND, active
from nws.meta import KINDS
from nws.meta.base import MetaSettings, Task
from nws.progress import say
from nws.space import PROPERTY_NAMES, SNAPSHOT_TARGETS
from nws.tracking.datasets import log_input
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
    robustness: tuple[str, ...] = ()  # transformations of the test nets to evaluate again on
    activations: list[str] = field(default_factory=list)  # per net, for `rescale`
    sweep_lengths: list[int] = field(default_factory=list)  # the how-much sweep beyond slice_length
    selection: str = ""  # the run query that selected the nets, as the registry records it
    zoo_input: Any = None  # the nets as the MLflow dataset its runs learned from (`nws.tracking.datasets`)


@dataclass
class Findings:
    """What one child run adds to the dissection: its per-snapshot rows (when) and its position
    sweep (where); None for a child of the how-much sweep, whose row is all the dissection reads."""

    prop: str
    model: str
    statistics: Any  # the per-net score's NetStatistics
    when: pd.DataFrame | None = None
    where: Any = None  # a dissection.WhereCurve, or None for whole-snapshot models


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
    log_input(plan.zoo_input)
    from nws.meta import KINDS

    rows, findings = [], []
    for prop, split in plan.splits.items():
        region = region_for(plan, prop, split, settings)
        for name in plan.models:
            interrupts.check()  # a stop that a library swallowed on the way
            row, found = train_one(plan, prop, split, name, region(name), register)
            rows.append(row)
            findings.append(found)
            _log_parent_metrics(row, found.statistics)
            for length in plan.sweep_lengths if KINDS[name].uses_slices else ():
                interrupts.check()
                swept = replace(region(name), slice_length=length)
                rows.append(train_one(plan, prop, split, name, swept, False, sweep=True)[0])
    table = pd.DataFrame(rows)
    mlflow.log_text(table.to_csv(index=False), "results.csv")
    from nws.meta.evaluation import results_png

    main = main_rows(table, settings.slice_length)
    if main["chance"].notna().any():
        mlflow.log_image(_image(results_png(main)), "results.png")
    _log_dissection(table, main, findings)
    return table


def region_for(plan: Plan, prop: str, split: Split, settings: MetaSettings) -> Any:
    """The settings of each model of `prop`: with `region=auto`, the region the probe chose for
    the slice models (`nws.meta.region_choice`; logged on the parent run), `all` for the others."""
    import mlflow

    from nws.meta.region_choice import AUTO, choose_region, widest_region

    if settings.region != AUTO or not any(KINDS[name].uses_slices for name in plan.models):
        return lambda name: replace(settings, region=widest_region(settings.region))
    longest = max([settings.slice_length, *plan.sweep_lengths])  # a region every length fits
    nets = np.concatenate([split.train, split.valid])
    choice = choose_region(plan.zoo, nets, split.labels, plan.k_range[1], split.is_regression, longest,
                           plan.layout, settings.seed)  # fmt: skip
    say(f"{prop}: slices from {choice.describe()}")
    mlflow.log_param(f"region_{prop}", choice.region)
    mlflow.log_metrics({f"region_probe_{prop}_{region}": score for region, score in choice.scores.items()})
    return lambda name: replace(settings, region=choice.region if KINDS[name].uses_slices else "all")


def main_rows(table: pd.DataFrame, slice_length: int) -> pd.DataFrame:
    """The rows at the main slice length (and those of whole-snapshot models): the how-much
    sweep's rows are in results.csv and the dissection only."""
    return table[table["slice_length"].isna() | (table["slice_length"] == slice_length)]


def _log_dissection(table: pd.DataFrame, main: pd.DataFrame, findings: list[Findings]) -> None:
    """dissection.png and dissection.md: when (each property's best model by snapshot k), where
    (the position sweep of its best slice model) and how much (every slice length)."""
    import mlflow

    from nws.meta.dissection import best_models, how_much_rows
    from nws.meta.dissection_figure import dissection_png
    from nws.meta.dissection_markdown import dissection_markdown

    best = best_models(main)
    whens = [f.when for f in findings if f.when is not None and not f.when.empty]
    when = pd.concat(whens, ignore_index=True) if whens else None
    swept = {(f.prop, f.model): f.where for f in findings if f.where is not None}
    where = {}
    if swept:
        with_sweep = main[[(p, m) in swept for p, m in zip(main["property"], main["model"], strict=True)]]
        where = {prop: swept[prop, model] for prop, model in best_models(with_sweep).items()}
    how_much = how_much_rows(table)
    mlflow.log_image(_image(dissection_png(when, where, how_much, best)), "dissection.png")
    mlflow.log_text(dissection_markdown(main, when, where, how_much, best), "dissection.md")


def _image(png: bytes) -> Any:
    from PIL import Image

    return Image.open(io.BytesIO(png))


def _log_parent_metrics(row: dict[str, Any], statistics: Any) -> None:
    """The (property, model)'s metrics on the parent run: its scores, their interval and test
    (`NetStatistics.parent_metrics`) and its baseline; learning-rate names only for `lrate`."""
    import mlflow

    from nws.meta.regression import SCORES

    prop, model = row["property"], row["model"]
    mlflow.log_metrics(statistics.parent_metrics(prop, model))
    mlflow.log_metrics({f"{key}_{prop}_{model}_{name}": row[f"{measure}_{name}"]
                        for key, measure in ROBUST_MEASURES.items() for name in ROBUSTNESS_NAMES
                        if f"{measure}_{name}" in row})  # fmt: skip
    if prop in SNAPSHOT_TARGETS:
        mlflow.log_metrics({f"{score}{part}_{prop}_{model}": row[f"{score}{part}"] for score in SCORES
                            for part in ("", "_ci_low", "_ci_high")})  # fmt: skip
        mlflow.log_metrics({f"mae_{prop}_constant": row["constant_guess_mae"]})
    elif prop == "lrate":
        mlflow.log_metrics({f"mae_lrate_{model}": row["slice_mae"], f"netmae_lrate_{model}": row["net_mae"],
                            "mae_lrate_constant": row["constant_guess_mae"]})  # fmt: skip
    else:
        mlflow.log_metrics({f"acc_{prop}_{model}": row["slice_accuracy"],
                            f"netacc_{prop}_{model}": row["net_accuracy"],
                            f"chance_{prop}": row["chance"]})  # fmt: skip


def train_one(
    plan: Plan,
    prop: str,
    split: Split,
    name: str,
    settings: MetaSettings,
    register: bool,
    sweep: bool = False,
) -> tuple[dict[str, Any], Findings]:
    """Train, evaluate, log and (with `register`) register model `name` for `prop`: its row of
    the results table and what it adds to the dissection. A child of the how-much sweep
    (`sweep`) is named and tagged by its slice length and skips the position sweep."""
    import mlflow

    from nws.meta import KINDS, create
    from nws.meta.dissection import when_rows
    from nws.meta.evaluation import confusion_png, evaluate
    from nws.meta.samples import Samples
    from nws.registry.registration import log_meta_classifier, version_description, version_tags

    zoo = plan.zoo
    task = Task(prop, split.classes)
    samples = {
        part: Samples.of(
            zoo, nets, split.labels, plan.k_range, settings.region, settings.slice_length, plan.layout
        )
        for part, nets in (("train", split.train), ("valid", split.valid), ("test", split.test))
    }
    uses_slices = KINDS[name].uses_slices
    length = f" (L = {settings.slice_length})" if sweep else ""
    say(f"{prop} / {name}{length}: {len(split.train)} train, {len(split.valid)} valid, "
        f"{len(split.test)} test nets")  # fmt: skip
    tags = {TAG_ROLE: "meta-classifier", "nws.property": prop, "nws.model": name, TAG_BACKEND: active()}
    if uses_slices:
        tags["nws.slice_length"] = str(settings.slice_length)
    run_name = f"{prop}-{name}-L{settings.slice_length}" if sweep else f"{prop}-{name}"
    with parent_run(tags, run_name=run_name, nested=True) as child:
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
        mlflow.log_metrics(model.fit_metrics)
        result = evaluate(model, samples["test"], split.labels[split.train], settings.seed,
                          sweep=not sweep, label=f"{prop} / {name}")  # fmt: skip
        if not sweep:
            result.metrics.update(_robustness(plan, model, split, settings))
        log_input(plan.zoo_input, {"nws.property": prop})
        metric = "accuracy_by_snapshot" if not task.is_regression else "mae_by_snapshot"
        for k, value in result.by_snapshot.items():
            mlflow.log_metric(metric, value, step=int(k))
        mlflow.log_text(result.per_net.to_csv(index=False), "per_net.csv")
        if result.confusion is not None:
            over = "its snapshots and their slices" if uses_slices else "its snapshots"
            title = (f"{prop} / {name}: {int(result.confusion.sum())} test nets\n(each: argmax of "
                     f"its mean probability\nover {over})")  # fmt: skip
            mlflow.log_image(_image(confusion_png(result.confusion, split.classes, title)), "confusion.png")
            counts = pd.DataFrame(result.confusion, index=list(split.classes), columns=list(split.classes))
            mlflow.log_text(counts.rename_axis("true/predicted").to_csv(), "confusion.csv")
        stats = result.statistics
        found = Findings(prop, name, stats)
        if not sweep:
            found.when = when_rows(prop, name, result.per_snapshot, stats.baseline, seed=settings.seed)
        if result.sweep is not None:
            found.where = _log_sweep(result, samples["test"], task, plan, settings, name)
        metric, value, higher_is_better = result.registry_metric
        about = version_tags(
            plan.selection,
            plan.k_range,
            len(plan.zoo),
            split,
            name,
            settings,
            result.metrics.get("chance"),
            child.info.run_id,
        )
        registration = log_meta_classifier(
            model, register, value, metric, higher_is_better, about,
            version_description(about, metric, value), metrics=result.metrics, dataset=plan.zoo_input,
        )  # fmt: skip
        row = {"property": prop, "model": name, "run_id": child.info.run_id,
               "slice_length": settings.slice_length if uses_slices else np.nan, **result.metrics,
               "chance": result.metrics.get("chance", np.nan), "n_train_nets": len(split.train),
               **stats.row()}  # fmt: skip
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
    return row, found


ROBUSTNESS_NAMES = ("permute", "rescale")
ROBUST_MEASURES = {"netacc": "net_accuracy", "netmae": "net_mae", "tau": "tau"}
"""Parent-run metric prefix -> the child's metric that the robustness protocol repeats."""


def _robustness(plan: Plan, model: Any, split: Split, settings: MetaSettings) -> dict[str, float]:
    """The model's figures on the test nets transformed by each of `plan.robustness`
    (`nws.meta.robustness`): `<measure>_<transformation>`, and `n_<transformation>d` nets changed."""
    from nws.meta.evaluation import evaluate
    from nws.meta.robustness import transformed_zoo
    from nws.meta.samples import Samples

    out: dict[str, float] = {}
    for name in plan.robustness:
        with tempfile.TemporaryDirectory(prefix=f"nws-{name}-") as tmp:
            activations = plan.activations or [""] * len(plan.zoo)
            zoo, changed = transformed_zoo(plan.zoo, split.test, plan.k_range, name, plan.layout,
                                           activations, settings.seed, Path(tmp))  # fmt: skip
            test = Samples.of(zoo, split.test, split.labels, plan.k_range, settings.region,
                              settings.slice_length, plan.layout)  # fmt: skip
            result = evaluate(model, test, split.labels[split.train], settings.seed, sweep=False)
            zoo.close()
        out.update({f"{measure}_{name}": result.metrics[measure] for measure in ROBUST_MEASURES.values()
                    if measure in result.metrics})  # fmt: skip
        out[f"n_{name}d"] = float(changed)
        say(f"  {name}: {changed} of {len(split.test)} test nets transformed")
    return out


def _log_sweep(result: Any, test: Any, task: Task, plan: Plan, settings: MetaSettings, model: str) -> Any:
    """position_sweep.npy, .png and .json on the child run; its curve for the dissection."""
    import mlflow

    from nws.meta.dissection import ACCURACY, MAE, WhereCurve
    from nws.meta.evaluation import sweep_accuracy, sweep_png

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "position_sweep.npy"
        np.save(path, result.sweep)
        mlflow.log_artifact(str(path))
    curve = sweep_accuracy(result, test.label)
    boundary = None
    if settings.region == "all":
        zoo = plan.zoo
        boundary = float(np.mean(zoo.conv[test.net] / zoo.lengths[test.net]))
    chance = 1.0 / len(task.classes) if task.classes else float("nan")
    ylabel = "mean absolute error" if task.is_regression else "accuracy"
    title = f"{task.prop} / {model}"
    mlflow.log_image(_image(sweep_png(curve, chance, boundary, title, ylabel)), "position_sweep.png")
    mlflow.log_text(json.dumps({"positions": len(curve), "curve": curve.tolist()}), "position_sweep.json")
    measure = MAE if task.is_regression else ACCURACY
    return WhereCurve(curve, boundary, result.statistics.baseline, model, measure, settings.region)
