"""The `main` entry point: the whole study end to end. Sample a small zoo on the offline datasets,
train the meta-classifiers on every property that varies, register the champions and print the
accuracy table against chance.

Its parameters are those of `sample` and `train` (declared there, once), with the defaults
overridden here (and only here) small enough for a 2-core CPU; the nets are selected by the
campaign's tag.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import field
from typing import Any

import pandas as pd

from nws import space
from nws.backend import select
from nws.commands.sample import SampleOptions
from nws.commands.train import TrainOptions, parse_k
from nws.errors import ParameterError
from nws.meta import KINDS
from nws.meta.region_choice import widest_region
from nws.tracking.tags import TAG_CAMPAIGN, TAG_ROLE, tag_equals

SAMPLE_DEFAULTS = {
    "n_nets": 96,
    "subset": "fixed",
    "campaign": "main",
    "prints": 4,
    "max_epochs": 3,
    "min_epochs": 3,
    "max_train_images": 500,
    "max_eval_images": 200,
    "workers": 2,
}
"""96 cheap nets of the fixed architecture (3 epochs of 500 images, snapshots after epochs 0-3) in
two worker processes: measured on 2 cores, many nets decode more properties significantly than
fewer, longer-trained ones at the same cost (README, "main")."""
TRAIN_DEFAULTS = {"K": "4,4", "slice_length": 512, "epochs": 30, "steps": 1000,
                  "models": "stats,layer_stats", "test_fraction": 0.3}  # fmt: skip
"""The last snapshot; the two statistics models; 30 % of the nets held out, so each property has
20-30 test nets. The DMC is left out: it needs ~1,000 steps to read the initialisation as
`stats` does on this zoo (1.000 per net; 0.833 at 300 steps; benchmarks/dmc_steps.py), ~8.5
minutes per property on 2 CPU cores, an hour for the seven. models=dmc,stats,layer_stats adds
it with that budget."""
TRAIN_FROM_CAMPAIGN = ("experiment", "filter", "seed", "backend")
"""Train parameters that `main` sets itself: the nets are the campaign's in the experiment of its
runs (sample's `experiment`), the seed and the Keras backend are shared."""


def _fields(options: type, defaults: dict[str, Any], skip: tuple[str, ...] = ()) -> list[tuple]:
    return [
        (f.name, f.type, field(default=defaults.get(f.name, f.default), metadata=f.metadata))
        for f in dataclasses.fields(options)
        if f.name not in skip
    ]


MainOptions = dataclasses.make_dataclass(
    "MainOptions",
    _fields(SampleOptions, SAMPLE_DEFAULTS) + _fields(TrainOptions, TRAIN_DEFAULTS, TRAIN_FROM_CAMPAIGN),
    frozen=True,
)
MainOptions.__doc__ = "The parameters of the `main` entry point: those of sample and train."


def _part(options: Any, target: type, **overrides: Any) -> Any:
    """The `target` options (sample's or train's) that `main`'s options hold, with overrides."""
    names = {f.name for f in dataclasses.fields(target)}
    values = {k: v for k, v in dataclasses.asdict(options).items() if k in names}
    return target(**{**values, **overrides})


def training_options(options: Any, experiment: str) -> TrainOptions:
    """The `train` options of `main`: its own, the nets of its campaign (by the campaign's tag,
    the name quoted) in `experiment`, and the campaign's seed."""
    return _part(
        options, TrainOptions, experiment=experiment, filter=tag_equals(TAG_CAMPAIGN, options.campaign),
        seed=options.seed,
    )  # fmt: skip


def smallest_region(subset: str, region: str) -> int:
    """The fewest weights that `region` spans in any architecture the subset draws (the fixed
    subset has one): a longer slice fails `train` as soon as a net that small is selected."""
    from nws.net.regions import region_size
    from nws.net.snapshots import weight_layout

    base = {p.name: p.choices(subset)[0] if p.is_categorical else p.low for p in space.PROPERTIES}
    choices = [space.BY_NAME[name].choices(subset) for name in space.ARCHITECTURE]
    spans = []
    for architecture in itertools.product(*choices):
        values = {**base, **dict(zip(space.ARCHITECTURE, architecture, strict=True))}
        layout = weight_layout(space.NetConfig(**values))
        spans.append(region_size(layout.n_weights, layout.weightn_conv, region, layout))
    return min(spans)


def check_before_sampling(options: Any, sample: SampleOptions) -> None:
    """Everything that would fail the training part after the whole zoo is sampled: the sample
    and train parameters (the campaign's name among them: it must fit in the selection's
    filter), K against `prints`, the slice lengths against the subset's architectures,
    properties that cannot vary in this campaign and models that cannot run."""
    settings = sample.settings()
    props, models = _part(options, TrainOptions).validate()
    try:
        parse_k(options.K, options.prints)
    except ParameterError:
        raise ParameterError(
            "K",
            f"{options.K!r} is not a range a,b within 1..{options.prints} "
            "(prints: the snapshots each net keeps)",
        ) from None
    if options.props.strip() not in ("", "all") and settings.replay is None:
        drawn = {name: space.BY_NAME[name].choices(options.subset, list(settings.datasets)) for name in props}
        constant = [f"{name} (always {choices[0]})" for name, choices in drawn.items() if len(choices) == 1]
        if constant:
            raise ParameterError("props", f"does not vary in this campaign: {', '.join(constant)}")
    if options.subset != "fixed" and models == ["layer_stats"]:
        raise ParameterError(
            "models", f"layer_stats needs nets of one architecture; the {options.subset} subset draws it"
        )
    sweep = _part(options, TrainOptions).sweep_lengths()
    if any(KINDS[m].uses_slices for m in models):
        region = widest_region(options.region)
        span = smallest_region(options.subset, region)
        which = "architecture" if options.subset == "fixed" else "smallest architecture"
        for name, length in [("slice_length", options.slice_length), *(("slice_lengths", s) for s in sweep)]:
            if length > span:
                raise ParameterError(
                    name,
                    f"{length} is longer than the {region} part of the {options.subset} "
                    f"subset's {which} ({span} weights)",
                )
    elif sweep:
        raise ParameterError("slice_lengths", "no slice model (dmc, stats) among the models to sweep")


def run_main(options: Any) -> pd.DataFrame:
    """Sample, then train on the campaign's nets; return the results table."""
    import mlflow

    from nws.commands.sample import run_campaign
    from nws.commands.train import format_table, run_training
    from nws.progress import say
    from nws.tracking.runs import parent_run

    sample = _part(options, SampleOptions)
    check_before_sampling(options, sample)
    select(sample.backend)  # before anything imports Keras
    tags = {TAG_ROLE: "study", TAG_CAMPAIGN: options.campaign}
    with parent_run(tags, run_name=f"nws-main-{options.campaign}", experiment=options.experiment) as parent:
        with parent_run(run_name=f"sample-{options.campaign}", nested=True):
            summary = run_campaign(sample)
        say(summary.line())
        train = training_options(options, mlflow.get_experiment(parent.info.experiment_id).name)
        with parent_run(run_name=f"meta-{options.campaign}", nested=True):
            table = run_training(train)
        say(format_table(table))
    return table
