"""The hyper-parameter space of the NWS study, declared once.

Everything that needs the 13 properties (the Optuna sampler, the CNN builder, the meta-classifier's
labels, the NWS importer and exporter) reads them from `PROPERTIES`. Categorical options are listed
in the order of their NWS integer code, so `options.index(value)` is the code written to `meta.csv`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal

import numpy as np

from nws.errors import ParameterError

Subset = Literal["fixed", "main"]
SUBSETS: tuple[str, ...] = ("fixed", "main")

PAPER_DATASETS: tuple[str, ...] = ("mnist", "cifar10", "svhn", "stl10", "fashion")
"""The five datasets of the study, in the order of their NWS code."""


@dataclass(frozen=True)
class Property:
    """One hyper-parameter of a net: its NWS column name and its options.

    `options` are the readable values (MLflow params, labels). `codes` are what an NWS `meta.csv`
    holds for each option (an integer code, the value itself, or the dataset name).
    `fixed` is the value pinned in the fixed subset (None: drawn in both subsets).
    `drawn` is False for a property the released study never varied (batch norm).
    """

    name: str
    kind: Literal["categorical", "uniform"]
    options: tuple[Any, ...] = ()
    codes: tuple[Any, ...] = ()
    low: float = math.nan
    high: float = math.nan
    fixed: Any = None
    drawn: bool = True
    default: Any = None

    @property
    def is_categorical(self) -> bool:
        return self.kind == "categorical"

    @property
    def is_architecture(self) -> bool:
        return self.fixed is not None

    def choices(self, subset: str, datasets: Sequence[str] | None = None) -> tuple[Any, ...]:
        """The options a campaign draws from for this property."""
        if self.name == "dataset":
            return tuple(datasets) if datasets else self.options
        if not self.drawn:
            return (self.default,)
        if subset == "fixed" and self.fixed is not None:
            return (self.fixed,)
        return self.options

    def code(self, value: Any) -> Any:
        """The NWS `meta.csv` code of a readable value."""
        if not self.is_categorical:
            return float(value)
        if self.name == "dataset":
            return str(value)
        return self.codes[self.options.index(value)]

    def parse(self, raw: Any) -> Any:
        """A readable value from a readable value, an NWS code or their string forms.

        Raises ParameterError naming the property when the value is outside the space.
        """
        if not self.is_categorical:
            try:
                value = float(raw)
            except (TypeError, ValueError):
                raise ParameterError(self.name, f"{raw!r} is not a number") from None
            if not (self.low <= value <= self.high):
                raise ParameterError(self.name, f"{value} is outside the range [{self.low}, {self.high}]")
            return value
        if self.name == "dataset":
            return str(raw).strip()
        text = str(raw).strip()
        for option, code in zip(self.options, self.codes, strict=True):
            if text.lower() in {str(option).lower(), str(code).lower()}:
                return option
        if text.lower() in _BOOLEAN_WORDS and self.codes == (0, 1):
            return self.options[_BOOLEAN_WORDS[text.lower()]]
        allowed = ", ".join(str(o) for o in self.options)
        raise ParameterError(self.name, f"{raw!r} is not one of {allowed}")


_BOOLEAN_WORDS = {"false": 0, "true": 1, "0.0": 0, "1.0": 1}

PROPERTIES: tuple[Property, ...] = (
    Property("dataset", "categorical", PAPER_DATASETS, PAPER_DATASETS),
    Property("lrate", "uniform", low=0.0002, high=0.005),
    Property("batch_size", "categorical", (32, 64, 128, 256), (32, 64, 128, 256)),
    Property("batch_norm", "categorical", ("off", "on"), (0, 1), drawn=False, default="on"),
    Property("augmentation", "categorical", ("off", "on"), (0, 1)),
    Property("optimizer", "categorical", ("adam", "rmsprop", "momentum"), (0, 1, 2)),
    Property("activation", "categorical", ("relu", "elu", "sigmoid", "tanh"), (0, 1, 2, 3)),
    Property(
        "initialization",
        "categorical",
        ("constant", "normal", "glorot_uniform", "glorot_normal"),
        (0, 1, 2, 3),
    ),
    Property("filter_size", "categorical", (3, 5, 7), (3, 5, 7), fixed=5),
    Property("depth_conv", "categorical", (3, 4, 5), (3, 4, 5), fixed=3),
    Property("depth_fc", "categorical", (2, 3, 4), (2, 3, 4), fixed=2),
    Property("width_conv", "categorical", (4, 8, 12), (4, 8, 12), fixed=8),
    Property("width_fc", "categorical", (64, 128, 192), (64, 128, 192), fixed=128),
)
"""The 13 properties in NWS column order."""

PROPERTY_NAMES: tuple[str, ...] = tuple(p.name for p in PROPERTIES)
BY_NAME: dict[str, Property] = {p.name: p for p in PROPERTIES}
ARCHITECTURE: tuple[str, ...] = tuple(p.name for p in PROPERTIES if p.is_architecture)


SNAPSHOT_TARGETS: dict[str, tuple[float, float]] = {
    "test_accuracy": (0.0, 1.0),
    "generalization_gap": (-1.0, 1.0),
}
"""What a meta-model can regress besides the 13 properties: a net's state at each snapshot rather
than how it was made (issue 18). The value of snapshot k is the net's test accuracy, or its train
minus test accuracy, at that snapshot's epoch; the range scales the regression target."""


def value_range(name: str) -> tuple[float, float]:
    """The range a regressed value lies in: a snapshot target's, or a uniform property's."""
    if name in SNAPSHOT_TARGETS:
        return SNAPSHOT_TARGETS[name]
    prop = BY_NAME[name]
    return prop.low, prop.high


def get_property(name: str) -> Property:
    try:
        return BY_NAME[name]
    except KeyError:
        raise ParameterError(
            "property", f"unknown property {name!r}; known: {', '.join(PROPERTY_NAMES)}"
        ) from None


@dataclass(frozen=True)
class NetConfig:
    """The 13 hyper-parameters of one net, as readable values (field order = NWS column order)."""

    dataset: str
    lrate: float
    batch_size: int
    batch_norm: str
    augmentation: str
    optimizer: str
    activation: str
    initialization: str
    filter_size: int
    depth_conv: int
    depth_fc: int
    width_conv: int
    width_fc: int

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> NetConfig:
        """Parse readable values or NWS codes; every property must be present."""
        missing = [n for n in PROPERTY_NAMES if n not in values]
        if missing:
            raise ParameterError("config", f"missing properties: {', '.join(missing)}")
        extra = sorted(set(values) - set(PROPERTY_NAMES))
        if extra:
            raise ParameterError("config", f"unknown properties: {', '.join(extra)}")
        return cls(**{p.name: p.parse(values[p.name]) for p in PROPERTIES})

    @classmethod
    def from_values(cls, values: Sequence[Any]) -> NetConfig:
        """Parse 13 values in NWS column order (as the original `--params`)."""
        if len(values) != len(PROPERTIES):
            raise ParameterError(
                "config",
                f"expected {len(PROPERTIES)} values in NWS column order, got {len(values)}",
            )
        return cls.from_mapping(dict(zip(PROPERTY_NAMES, values, strict=True)))

    @classmethod
    def parse(cls, text: str) -> NetConfig:
        """Parse `name=value,...` (all 13) or 13 comma-separated values in NWS column order."""
        parts = [p.strip() for p in text.split(",") if p.strip()]
        if parts and all("=" in p for p in parts):
            pairs = [p.split("=", 1) for p in parts]
            return cls.from_mapping({k.strip(): v.strip() for k, v in pairs})
        if any("=" in p for p in parts):
            raise ParameterError("config", "mix of name=value pairs and plain values")
        return cls.from_values(parts)

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def as_params(self) -> dict[str, str]:
        """Readable string values, as logged to MLflow (lrate with full precision)."""
        return {k: repr(v) if isinstance(v, float) else str(v) for k, v in self.as_dict().items()}

    def nws_codes(self) -> dict[str, Any]:
        """The values an NWS `meta.csv` holds for this net."""
        return {p.name: p.code(getattr(self, p.name)) for p in PROPERTIES}

    def architecture(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in ARCHITECTURE}

    def check(self, subset: str, datasets: Sequence[str] | None = None) -> None:
        """Raise ParameterError when this configuration lies outside a campaign's space."""
        for prop in PROPERTIES:
            value = getattr(self, prop.name)
            if prop.name == "lrate":
                continue  # parse() already bounds it
            choices = prop.choices(subset, datasets)
            if value not in choices:
                where = f"the {subset} subset" if prop.is_architecture else "this campaign"
                allowed = ", ".join(str(c) for c in choices)
                raise ParameterError(
                    f"config.{prop.name}", f"{value!r} is outside {where} (allowed: {allowed})"
                )


def check_subset(subset: str) -> str:
    if subset not in SUBSETS:
        raise ParameterError("subset", f"{subset!r} is not one of {', '.join(SUBSETS)}")
    return subset


def suggest(trial: Any, subset: str, datasets: Sequence[str]) -> NetConfig:
    """Draw (or, for an enqueued trial, replay) one configuration through an Optuna trial.

    Every property is suggested, single-choice ones too, so the Optuna study shows all 13.
    """
    values: dict[str, Any] = {}
    for prop in PROPERTIES:
        if prop.is_categorical:
            values[prop.name] = trial.suggest_categorical(prop.name, list(prop.choices(subset, datasets)))
        else:
            values[prop.name] = trial.suggest_float(prop.name, prop.low, prop.high)
    return NetConfig(**values)


def trial_seed(campaign_seed: int, trial_number: int) -> int:
    """The training seed of a net: distinct for every trial of a campaign, valid for numpy."""
    return (campaign_seed + trial_number) % (2**32)


def draw_seed(campaign_seed: int, trial_number: int, name: str) -> int:
    """An independent seed per (campaign seed, trial, property) for the hyper-parameter draw."""
    key = [campaign_seed % (2**32), trial_number, *name.encode()]
    return int(np.random.SeedSequence(key).generate_state(1)[0])


def _trial_seeded_sampler_class() -> type:
    import optuna

    class TrialSeededSampler(optuna.samplers.BaseSampler):
        """Optuna's RandomSampler, reseeded per (campaign seed, trial number, property).

        A plain `RandomSampler(seed)` keeps its state in the sampler object, so workers that share a
        study with the same seed draw identical configurations. Keying each draw on the trial number
        makes a configuration a pure function of the campaign seed and the trial, whichever worker
        draws it and in whatever order.
        """

        def __init__(self, seed: int) -> None:
            self.seed = seed

        def infer_relative_search_space(self, study, trial):
            return {}

        def sample_relative(self, study, trial, search_space):
            return {}

        def sample_independent(self, study, trial, param_name, param_distribution):
            sampler = optuna.samplers.RandomSampler(seed=draw_seed(self.seed, trial.number, param_name))
            return sampler.sample_independent(study, trial, param_name, param_distribution)

    return TrialSeededSampler


def __getattr__(name: str) -> Any:
    """Optuna is imported only for the sampler: the CNN family and the configs need no Optuna."""
    if name == "TrialSeededSampler":
        value = _trial_seeded_sampler_class()
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
