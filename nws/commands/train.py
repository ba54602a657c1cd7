"""The `train` entry point: meta-classifiers on nets selected by a run query. Its parameters, and
everything that can be wrong with its input (the query, K, the slice length, a property with one
class, a corrupted artifact), checked before the first model is trained, so bad input never
registers anything. The training and its runs: `nws.commands.train_runs`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from nws.backend import BACKENDS, DEFAULT_BACKEND, TAG_BACKEND, check_backend, select
from nws.checks import SEED, Count, Directory, Real, writable_directory
from nws.commands.options import Selection, check_declared, default_of, names_list, param
from nws.commands.train_runs import Plan, train_all
from nws.errors import ParameterError
from nws.meta import KINDS, MODEL_NAMES
from nws.meta.base import SELECT_BY, MetaSettings
from nws.meta.region_choice import AUTO, REGION_CHOICES, widest_region
from nws.net.regions import region_size
from nws.progress import Steps, say
from nws.space import PROPERTY_NAMES, SNAPSHOT_TARGETS, get_property
from nws.tracking.runs import parent_run
from nws.tracking.tags import TAG_ROLE
from nws.zoo.cache import default_cache_dir
from nws.zoo.splits import SPLITS, Split, UnsplittableError, split_nets


@dataclass(frozen=True)
class TrainOptions(Selection):
    """The parameters of the `train` entry point: the selection, then the training. The
    meta-classifier's settings take their defaults from `MetaSettings`."""

    props: str = param(
        "all", "comma list of properties to predict (or test_accuracy, generalization_gap), or all"
    )
    K: str = param("", "snapshot range a,b within 1..prints (default: every snapshot)")
    slice_length: int = param(
        default_of(MetaSettings, "slice_length"), "consecutive weights per input slice", Count(1)
    )
    slice_lengths: str = param(
        "", "comma list of further slice lengths for the dissection's how-much sweep (default: none)"
    )
    region: str = param(
        AUTO,
        "where slices are cut: all, conv, fc, nonkernel (biases, batch norm) or auto (chosen per property)",
    )
    models: str = param("dmc,stats,layer_stats", f"meta-classifiers, comma list of: {', '.join(MODEL_NAMES)}")
    steps: int = param(
        default_of(MetaSettings, "steps"),
        "DMC optimizer steps, whatever the zoo's size (0: the paper's schedule, epochs passes over the "
        "training samples at a constant rate)",
        Count(0),
    )
    validate_every: int = param(
        default_of(MetaSettings, "validate_every"),
        "DMC steps between validations (it keeps its best)",
        Count(1),
    )
    patience: int = param(
        default_of(MetaSettings, "patience"),
        "validations without a better DMC validation (select_by) before it stops (0: never)",
        Count(0),
    )
    select_by: str = param(
        default_of(MetaSettings, "select_by"), "what keeps the DMC's best weights: accuracy or loss"
    )
    normalize: bool = param(
        default_of(MetaSettings, "normalize"), "DMC inputs divided by the training weights' spread"
    )
    epochs: int = param(
        default_of(MetaSettings, "epochs"),
        "training epochs of the invariant model, and of the DMC at steps=0",
        Count(1),
    )
    batch_size: int = param(default_of(MetaSettings, "batch_size"), "DMC batch size", Count(1))
    learning_rate: float = param(
        default_of(MetaSettings, "learning_rate"),
        "DMC (peak, cosine-decayed) and invariant learning rate (Adam)",
        Real(0.0, low_open=True),
    )
    test_fraction: float = param(
        0.2, "share of each class's nets held out for testing", Real(0.0, 1.0, low_open=True, high_open=True)
    )
    split: str = param("random", "random (by net, seeded) or published (the nets' nws.split tags)")
    seed: int = param(default_of(MetaSettings, "seed"), "seed of the split and the training", SEED)
    register: bool = param(True, "register the models and move the champion alias")
    backend: str = param(
        DEFAULT_BACKEND, f"Keras backend of the DMC and the invariant model: {' or '.join(BACKENDS)}"
    )
    save_optimizer: bool = param(
        default_of(MetaSettings, "save_optimizer"),
        "keep the DMC's optimizer state in its model file (three times the size; to resume training)",
    )
    cache_dir: str = param("", "snapshot cache (default $NWS_CACHE_DIR or ~/.cache/nws/zoo)", Directory())
    robustness: str = param(
        "", "also evaluate on test nets transformed at random: comma list of permute, rescale"
    )

    def transforms(self) -> tuple[str, ...]:
        """The robustness protocol's transformations, checked."""
        from nws.meta.robustness import TRANSFORMS

        names = names_list(self.robustness)
        for name in names:
            if name not in TRANSFORMS:
                raise ParameterError(
                    "robustness", f"unknown transformation {name!r} (known: {', '.join(TRANSFORMS)})"
                )
        return tuple(names)

    def validate(self) -> tuple[list[str], list[str]]:
        """Check the parameters that need no data; return the properties and models."""
        check_declared(self)
        check_backend(self.backend)
        for name, choices in (("split", SPLITS), ("region", REGION_CHOICES), ("select_by", SELECT_BY)):
            if getattr(self, name) not in choices:
                raise ParameterError(name, f"{getattr(self, name)!r} is not one of {', '.join(choices)}")
        self.sweep_lengths()
        k_bounds(self.K)  # its syntax now; its range once the nets' snapshot counts are known
        models = names_list(self.models)
        for name in models:
            if name not in MODEL_NAMES:
                raise ParameterError("models", f"unknown model {name!r} (known: {', '.join(MODEL_NAMES)})")
        if not models:
            raise ParameterError("models", "no model given")
        props = list(PROPERTY_NAMES) if self.props.strip() in ("", "all") else names_list(self.props)
        for name in props:
            if name in SNAPSHOT_TARGETS:
                continue
            try:
                get_property(name)
            except ParameterError:
                known = ", ".join([*PROPERTY_NAMES, *SNAPSHOT_TARGETS])
                raise ParameterError("props", f"unknown property {name!r} (known: {known}, all)") from None
        self.transforms()
        writable_directory("cache_dir", self.cache_dir or default_cache_dir())
        return props, models

    def sweep_lengths(self) -> list[int]:
        """The slice lengths of the how-much sweep beyond `slice_length`, ascending."""
        return [length for length in parse_slice_lengths(self.slice_lengths) if length != self.slice_length]

    def settings(self) -> MetaSettings:
        """The meta-classifiers' settings: every MetaSettings field this entry point has."""
        return MetaSettings(
            **{f.name: getattr(self, f.name) for f in fields(MetaSettings) if hasattr(self, f.name)}
        )


def k_bounds(text: str) -> tuple[int, int] | None:
    """The snapshot range `a,b` (1-based, inclusive; `a` alone is `a,a`) as written, checked
    before any net is known: None when empty (every snapshot)."""
    if not text.strip():
        return None
    try:
        parts = [int(p) for p in text.replace("..", ",").split(",")]
    except ValueError:
        raise ParameterError("K", f"{text!r} is not a range a,b") from None
    if len(parts) == 1:
        parts = parts * 2
    a, b = parts if len(parts) == 2 else (0, 0)
    if not 1 <= a <= b:
        raise ParameterError("K", f"{text!r} is not a range a,b with 1 <= a <= b")
    return a, b


def parse_slice_lengths(text: str) -> list[int]:
    """`slice_lengths` as written, `a,b,...`: positive integers, ascending, without repeats."""
    try:
        lengths = sorted({int(part) for part in names_list(text)})
    except ValueError:
        lengths = [0]
    if lengths and lengths[0] < 1:
        raise ParameterError("slice_lengths", f"{text!r} is not a comma list of positive integers")
    return lengths


def parse_k(text: str, prints: int) -> tuple[int, int]:
    """A snapshot range `a,b` (1-based, inclusive) within 1..prints; empty = all snapshots."""
    bounds = k_bounds(text)
    if bounds is None:
        return 1, prints
    if bounds[1] > prints:
        raise ParameterError("K", f"{text!r} is outside 1..{prints} (the fewest snapshots of a selected net)")
    return bounds


def check_slice_lengths(
    nets: pd.DataFrame, used: np.ndarray, region: str, lengths: list, layout: Any
) -> None:
    """Refuse a slice longer than the shortest region among the nets that will be used; `lengths`
    are (parameter, length) pairs."""
    shapes = zip(nets["n_weights"].iloc[used], nets["weightn_conv"].iloc[used], strict=True)
    try:
        span = np.array([region_size(n, c, region, layout) for n, c in shapes])
    except ValueError:
        raise ParameterError("region", f"{region} needs each net's tensor layout: the nets are not of "
                             "the NWS family, nor of one architecture") from None  # fmt: skip
    shortest = used[int(np.argmin(span))]
    for parameter, length in lengths:
        if length > span.min():
            raise ParameterError(
                parameter,
                f"{length} is longer than the {region} part of run {nets['run_id'].iloc[shortest]} "
                f"({int(span.min())} weights)",
            )


def split_property(nets: pd.DataFrame, prop: str, options: TrainOptions) -> Split:
    """The split of `prop`'s nets, or one line naming the parameter that cannot be met."""
    try:
        return split_nets(
            nets, prop, options.test_fraction, options.seed, published=options.split == "published"
        )
    except UnsplittableError as e:
        raise ParameterError("split" if e.published else "props", str(e)) from None


def plan(options: TrainOptions) -> Plan:
    """Check the input against the selected nets and build their zoo: what `train_all` runs."""
    from nws.net.snapshots import weight_layout
    from nws.space import NetConfig
    from nws.zoo.cache import ArtifactCache
    from nws.zoo.splits import varying_properties
    from nws.zoo.store import build_zoo
    from nws.zoo.targets import check_values, foreign_layout, layout_documents, snapshot_values

    props, models = options.validate()
    nets = options.query()
    say(f"selected {len(nets)} nets")
    explicit = options.props.strip() not in ("", "all")
    targets = [p for p in props if p in SNAPSHOT_TARGETS]
    varying, constant = varying_properties(nets, [p for p in props if p not in SNAPSHOT_TARGETS])
    if constant:
        message = ", ".join(f"{p} (always {nets[p].iloc[0] or 'unset'})" for p in constant)
        if explicit:
            raise ParameterError("props", f"does not vary in the selection: {message}")
        say(f"skipping properties that do not vary: {message}")
    if not varying and not targets:
        raise ParameterError("props", "no requested property varies in the selection")
    k_range = parse_k(options.K, int(nets["prints"].min()))
    # Nets imported from a foreign zoo (import_cnn_zoo) have no NWS properties: their layout
    # documents name their tensors.
    foreign = bool((nets[list(PROPERTY_NAMES)] == "").any(axis=None))
    documents = layout_documents(nets) if targets or foreign else []
    splits = {}
    for prop in varying:
        try:
            splits[prop] = split_property(nets, prop, options)
        except ParameterError as reason:
            if explicit:
                raise
            say(f"skipping {prop}: {str(reason).removeprefix('props: ')}")
    for target in targets:
        values = snapshot_values(documents, target, int(nets["prints"].max()))
        check_values(values, list(nets["run_id"]), target, k_range)
        try:
            splits[target] = split_nets(nets, target, options.test_fraction, options.seed,
                                        published=options.split == "published", targets=values)  # fmt: skip
        except UnsplittableError as e:
            raise ParameterError("split", str(e)) from None
    if not splits:
        raise ParameterError("props", "no property has enough nets per class (2) in the selection")
    layout = None
    if foreign and nets["n_weights"].nunique() == 1:
        layout = foreign_layout(documents[0])
    elif "layer_stats" in models:
        if nets["n_weights"].nunique() == 1:
            layout = weight_layout(NetConfig.from_mapping(nets.iloc[0][list(PROPERTY_NAMES)].to_dict()))
        else:
            say("skipping layer_stats: the selected nets do not share one architecture")
            models = [m for m in models if m != "layer_stats"]
            if not models:
                raise ParameterError("models", "layer_stats needs nets of one architecture")
    cache = ArtifactCache(Path(options.cache_dir).expanduser() if options.cache_dir else None)
    used = np.unique(np.concatenate([np.concatenate([s.train, s.valid, s.test]) for s in splits.values()]))
    sweep = options.sweep_lengths()
    if any(KINDS[m].uses_slices for m in models):
        lengths = [("slice_length", options.slice_length), *(("slice_lengths", n) for n in sweep)]
        check_slice_lengths(nets, used, widest_region(options.region), lengths, layout)
    elif sweep:
        raise ParameterError("slice_lengths", "no slice model (dmc, stats) among the models to sweep")
    with Steps("zoo: verifying snapshot files", len(nets), "nets") as steps:
        zoo = build_zoo(nets, cache, progress=steps.advance)
    stats = cache.stats
    how = f"{stats.verified} verified against their digests, {stats.downloaded} downloaded"
    if stats.repaired:
        how += f", {stats.repaired} damaged cache entries rebuilt"
    say(f"zoo: {len(zoo)} nets, {zoo.size_bytes / 1e6:.1f} MB ({how})")
    robustness = options.transforms()
    activations = _activations(nets, documents) if "rescale" in robustness else []
    from nws.tracking.datasets import zoo_dataset
    from nws.zoo.query import filter_string

    where = options.experiment.strip() or "the working experiment"
    selection = f"{filter_string(options.filter, options.min_test_accuracy)} (experiments: {where})"
    nets_digests = zip(zoo.nets["run_id"], zoo.nets["digest"], strict=True)
    trained_on = zoo_dataset(zoo.nets["campaign"], selection, nets_digests)
    return Plan(zoo, k_range, splits, models, layout, robustness, activations, sweep, selection, trained_on)


def _activations(nets: pd.DataFrame, documents: list[dict]) -> list[str]:
    """Each net's activation (what `rescale` needs): its property, or an imported net's config."""
    found = []
    for i, value in enumerate(nets["activation"]):
        config = documents[i].get("config", {}) if documents else {}
        found.append(str(value or config.get("activation") or config.get("config.activation") or ""))
    return found


def run_training(options: TrainOptions) -> pd.DataFrame:
    """Train, evaluate, log and register; return the results table."""
    select(options.backend)  # before anything imports Keras
    the_plan = plan(options)
    tags = {TAG_ROLE: "meta", TAG_BACKEND: options.backend}
    with parent_run(tags, asdict(options), run_name="meta-classifiers"):
        return train_all(the_plan, options.settings(), options.register)


def format_table(table: pd.DataFrame) -> str:
    """The results table as printed at the end: per-net scores with their intervals and tests;
    a snapshot target's line also gives Kendall's tau with its interval and R2; the robustness
    protocol's figures follow their row."""
    from nws.meta.results_table import format_statistics_table

    lines = format_statistics_table(table).splitlines()
    for i, row in enumerate(table.to_dict("records"), start=1):
        extra = ""
        if row["property"] in SNAPSHOT_TARGETS:
            tau = f"tau {row['tau']:.3f} [{row['tau_ci_low']:.3f}, {row['tau_ci_high']:.3f}]"
            extra += f"; {tau}, R2 {row['r2']:.3f}"
        for name in ("permute", "rescale"):
            for measure in ("tau", "net_mae", "net_accuracy"):
                value = row.get(f"{measure}_{name}")
                if value is not None and value == value:  # present and not NaN
                    extra += f"; {name}: {measure} {value:.3f}"
                    break
        lines[i] += extra
    return "\n".join([
        *lines,
        "per net [95 % CI]: Wilson interval over test nets (MAE: bootstrap over test nets)",
        "p-value: one-sided exact binomial test over test nets against chance = 1/classes "
        "(lrate and accuracy targets: sign-flip test against the constant guess); * marks p < 0.01",
    ])  # fmt: skip
