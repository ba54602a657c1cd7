"""Which nets train, validate and test each property: split by net, never by snapshot, with
balanced classes, so that chance is exactly 1/C. A property that cannot be split as asked (one
class in the selection, too few nets of a class, no published split) raises `UnsplittableError`;
`train` reports it naming its parameter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from nws.space import PROPERTY_NAMES, SNAPSHOT_TARGETS


class UnsplittableError(ValueError):
    """A property's nets cannot be split as asked. `published`: the published split tags are
    what is missing (else the classes are too small)."""

    def __init__(self, message: str, published: bool = False) -> None:
        super().__init__(message)
        self.published = published


@dataclass(frozen=True)
class Split:
    """Which nets train, validate and test one property (balanced, by net)."""

    prop: str
    classes: tuple[str, ...]  # empty for the learning rate (regression)
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    labels: np.ndarray  # per net of the zoo: class index (or the learning rate); [nets, prints] for a target

    @property
    def is_regression(self) -> bool:
        return not self.classes

    @property
    def chance(self) -> float:
        return 1.0 / len(self.classes) if self.classes else float("nan")


SPLITS = ("random", "published")


def split_nets(
    nets: pd.DataFrame,
    prop: str,
    test_fraction: float,
    seed: int,
    valid_fraction: float = 0.1,
    published: bool = False,
    targets: np.ndarray | None = None,
) -> Split:
    """Split by net, never by snapshot. Classification: every class keeps the same number of nets
    in train and in test (the smallest class sets it), so chance is exactly 1/C.

    `published` takes train and test from the nets' `nws.split` tags (e.g. the published NWS
    train/test CSVs) instead of drawing them; each part is balanced the same way.

    `targets` [nets, prints] makes a regression of a snapshot target (`SNAPSHOT_TARGETS`): the
    labels are then per snapshot, still split by net."""
    rng = np.random.default_rng([seed, _property_index(prop)])
    parts = _published_parts(nets) if published else None
    if prop == "lrate" or targets is not None:
        classes: tuple[str, ...] = ()
        labels = (
            nets[prop].astype(np.float64).to_numpy() if targets is None else np.asarray(targets, np.float64)
        )
        if parts is not None:
            test, groups = (
                np.flatnonzero(parts == "test"),
                [rng.permutation(np.flatnonzero(parts == "train"))],
            )
        else:
            order = rng.permutation(len(nets))
            n_test = max(1, round(len(order) * test_fraction))
            test, groups = order[:n_test], [order[n_test:]]
    else:
        values = nets[prop].astype(str).to_numpy()
        classes = tuple(sorted(set(values), key=_natural))
        if len(classes) < 2:
            raise UnsplittableError(f"{prop} has a single class ({classes[0]}) in the selection")
        labels = np.array([classes.index(v) for v in values], dtype=np.int64)
        if parts is not None:
            test, groups = _balanced_published(prop, values, classes, parts, rng)
        else:
            members = [np.flatnonzero(values == c) for c in classes]
            per_class = min(len(m) for m in members)
            if per_class < 2:
                raise UnsplittableError(
                    f"{prop}: a class has {per_class} net(s); need 2 per class for train and test"
                )
            n_test = min(per_class - 1, max(1, round(per_class * test_fraction)))
            picks = [rng.permutation(m)[:per_class] for m in members]
            test = np.concatenate([p[:n_test] for p in picks])
            groups = [p[n_test:] for p in picks]
    # Validation nets come from each class's training nets, never leaving a class without one.
    n_valid = [int(len(g) * valid_fraction) if len(g) > 1 else 0 for g in groups]
    valid = np.concatenate([g[:n] for g, n in zip(groups, n_valid, strict=True)])
    train = np.concatenate([g[n:] for g, n in zip(groups, n_valid, strict=True)])
    return Split(prop, classes, np.sort(train), np.sort(valid).astype(np.int64), np.sort(test), labels)


def _property_index(prop: str) -> int:
    """A property's place in the seed of its split: its NWS column, or after them for a target."""
    if prop in PROPERTY_NAMES:
        return PROPERTY_NAMES.index(prop)
    return len(PROPERTY_NAMES) + list(SNAPSHOT_TARGETS).index(prop)


def _published_parts(nets: pd.DataFrame) -> np.ndarray:
    parts = nets["split"].fillna("").astype(str).to_numpy()
    unknown = int(np.sum(~np.isin(parts, ["train", "test"])))
    if unknown:
        raise UnsplittableError(
            f"{unknown} selected nets carry no nws.split tag of train or test", published=True
        )
    if not (parts == "test").any() or not (parts == "train").any():
        raise UnsplittableError("the selection needs nets tagged train and nets tagged test", published=True)
    return parts


def _balanced_published(
    prop: str, values: np.ndarray, classes: tuple[str, ...], parts: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, list[np.ndarray]]:
    chosen = {}
    for part in ("train", "test"):
        members = [rng.permutation(np.flatnonzero((values == c) & (parts == part))) for c in classes]
        per_class = min(len(m) for m in members)
        if per_class < 1:
            raise UnsplittableError(f"{prop}: a class has no {part} net in the published split")
        chosen[part] = [m[:per_class] for m in members]
    return np.concatenate(chosen["test"]), chosen["train"]


def _natural(value: str) -> tuple[int, float | str]:
    try:
        return (0, float(value))
    except ValueError:
        return (1, value)


def varying_properties(nets: pd.DataFrame, names: Sequence[str]) -> tuple[list[str], list[str]]:
    """The requested properties that vary in the selection, and those that do not."""
    varying = [n for n in names if nets[n].astype(str).nunique() > 1]
    return varying, [n for n in names if n not in varying]
