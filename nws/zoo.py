"""The zoo: the meta-dataset of many nets' snapshots, selected by an MLflow run query.

Snapshot artifacts are fetched in parallel, verified against the checksum tag the net's run
carries, kept in a local cache keyed by run id, and consolidated once into a single flat float32
file. Training reads slices from that file with positioned reads, so the weights are never all
held in RAM. A consolidated store is written under a temporary name and renamed when complete, so
a crash never leaves a half-written store that a later call would pick up.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from nws import tracking
from nws.errors import DataError, ParameterError
from nws.space import PROPERTY_NAMES

REGIONS = ("all", "conv", "fc")
BUILTIN_FILTER = (
    f"tags.`{tracking.TAG_ROLE}` = 'net' and attributes.status = 'FINISHED' "
    f"and tags.`{tracking.TAG_SNAPSHOTS}` = '{tracking.SNAPSHOTS_COMPLETE}'"
)
STORE_FORMAT = 1


def default_cache_dir() -> Path:
    """`$NWS_CACHE_DIR`, else `~/.cache/nws/zoo`."""
    return Path(os.environ.get("NWS_CACHE_DIR") or Path.home() / ".cache" / "nws" / "zoo")


@dataclass(frozen=True)
class Selection:
    """Which net runs form the zoo: the built-in condition AND the user's filter."""

    experiment: str = ""  # comma list of experiment names; empty = every experiment
    filter: str = ""
    min_test_accuracy: float = 0.0

    def filter_string(self) -> str:
        parts = [BUILTIN_FILTER]
        if self.min_test_accuracy > 0:
            parts.append(f"metrics.test_accuracy >= {self.min_test_accuracy!r}")
        if self.filter.strip():
            parts.append(self.filter.strip())
        return " and ".join(parts)


def query_nets(selection: Selection) -> pd.DataFrame:
    """One row per selected net: run id, the 13 properties, sizes, accuracy and tags."""
    import mlflow
    from mlflow.exceptions import MlflowException

    experiment_ids = None
    if selection.experiment.strip():
        experiment_ids = []
        for name in (n.strip() for n in selection.experiment.split(",") if n.strip()):
            experiment = mlflow.get_experiment_by_name(name)
            if experiment is None:
                raise ParameterError("experiment", f"no MLflow experiment named {name!r}")
            experiment_ids.append(experiment.experiment_id)
    try:
        runs = mlflow.search_runs(
            experiment_ids=experiment_ids,
            search_all_experiments=experiment_ids is None,
            filter_string=selection.filter_string(),
            output_format="list",
            order_by=["attributes.start_time ASC"],
        )
    except MlflowException as e:
        raise ParameterError("filter", str(e.message).splitlines()[0]) from None
    if not runs:
        raise ParameterError(
            "filter",
            f"no finished net run with complete snapshots matches {selection.filter_string()!r}",
        )
    return pd.DataFrame([_net_record(run) for run in runs])


def _net_record(run: Any) -> dict[str, Any]:
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    try:
        prints, n_weights = (int(x) for x in tags[tracking.TAG_WEIGHTS_SHAPE].split("x"))
        record = {
            "run_id": run.info.run_id,
            "experiment_id": run.info.experiment_id,
            "artifact_uri": run.info.artifact_uri,
            "sha256": tags[tracking.TAG_WEIGHTS_SHA256],
            "prints": prints,
            "n_weights": n_weights,
            "weightn_conv": int(metrics["weightn_conv"]),
            "weightn_fc": int(metrics["weightn_fc"]),
            "test_accuracy": metrics.get("test_accuracy", float("nan")),
            "subset": tags.get(tracking.TAG_SUBSET, ""),
            "campaign": tags.get(tracking.TAG_CAMPAIGN, ""),
            "split": tags.get(tracking.TAG_SPLIT, ""),
        }
        record.update({name: params[name] for name in PROPERTY_NAMES})
    except (KeyError, ValueError) as e:
        raise DataError(f"run {run.info.run_id}: not a complete nws net run (missing {e})") from None
    if record["weightn_conv"] + record["weightn_fc"] != n_weights:
        raise DataError(f"run {run.info.run_id}: weightn_conv + weightn_fc != {n_weights}")
    return record


def _is_local(artifact_uri: str) -> bool:
    from urllib.parse import urlparse

    return urlparse(artifact_uri).scheme in ("", "file")


def _local_path(uri: str) -> Path:
    from urllib.parse import unquote, urlparse

    return Path(unquote(urlparse(uri).path)) if uri.startswith("file:") else Path(uri)


def _digest(path: Path) -> str:
    """sha256 of the array data in an .npy file (what the run's tag records)."""
    array = np.load(path, mmap_mode="r")
    return hashlib.sha256(memoryview(np.ascontiguousarray(array)).cast("B")).hexdigest()


@dataclass
class FetchStats:
    downloaded: int = 0
    verified: int = 0
    reused: int = 0
    store_reused: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, name: str) -> None:
        with self.lock:
            setattr(self, name, getattr(self, name) + 1)


class ArtifactCache:
    """Snapshot artifacts by run id, verified once against the run's sha256 tag.

    A local artifact store is read in place (nothing copied); a remote one (an `mlflow server`)
    is downloaded into `<cache>/runs/<run_id>/`. A verified file is recorded with its size and
    modification time, so later calls neither download nor hash it again; a truncated or changed
    file fails that record and is fetched (or, in a local store, verified) again.
    """

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root or default_cache_dir())
        self.stats = FetchStats()

    def _record_path(self, run_id: str) -> Path:
        return self.root / "runs" / run_id / "verified.json"

    def _is_verified(self, run_id: str, path: Path, sha256: str) -> bool:
        try:
            record = json.loads(self._record_path(run_id).read_text())
            stat = path.stat()
        except (OSError, ValueError):
            return False
        return record == {"sha256": sha256, "path": str(path), "size": stat.st_size,
                          "mtime_ns": stat.st_mtime_ns}  # fmt: skip

    def _remember(self, run_id: str, path: Path, sha256: str) -> None:
        record = self._record_path(run_id)
        record.parent.mkdir(parents=True, exist_ok=True)
        stat = path.stat()
        tmp = record.with_suffix(f".tmp-{os.getpid()}-{threading.get_ident()}")
        tmp.write_text(json.dumps({"sha256": sha256, "path": str(path), "size": stat.st_size,
                                   "mtime_ns": stat.st_mtime_ns}))  # fmt: skip
        tmp.replace(record)

    def fetch(self, run_id: str, artifact_uri: str, sha256: str) -> Path:
        """The local path of a verified `snapshots/weights.npy`."""
        if _is_local(artifact_uri):
            path = _local_path(artifact_uri) / tracking.WEIGHTS_ARTIFACT
            if self._is_verified(run_id, path, sha256):
                self.stats.add("reused")
                return path
            self._verify(run_id, path, sha256, "in the artifact store")
            return path
        target = self.root / "runs" / run_id
        path = target / tracking.WEIGHTS_ARTIFACT
        if self._is_verified(run_id, path, sha256):
            self.stats.add("reused")
            return path
        for attempt in (1, 2):
            self._download(artifact_uri, target)
            try:
                self._verify(run_id, path, sha256, "after download")
                return path
            except DataError:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _download(self, artifact_uri: str, target: Path) -> None:
        import mlflow

        (target / "snapshots").mkdir(parents=True, exist_ok=True)
        mlflow.artifacts.download_artifacts(
            artifact_uri=f"{artifact_uri}/{tracking.WEIGHTS_ARTIFACT}",
            dst_path=str(target / "snapshots"),
        )
        self.stats.add("downloaded")

    def _verify(self, run_id: str, path: Path, sha256: str, where: str) -> None:
        try:
            digest = _digest(path)
        except (OSError, ValueError) as e:
            raise DataError(f"run {run_id}: snapshot artifact unreadable {where} ({e})") from None
        if digest != sha256:
            raise DataError(
                f"run {run_id}: snapshot artifact is corrupted {where} (sha256 does not match the "
                f"run's {tracking.TAG_WEIGHTS_SHA256} tag)"
            )
        self.stats.add("verified")
        self._remember(run_id, path, sha256)


class Zoo:
    """Every selected net's snapshots in one flat float32 file, and a table of the nets.

    Row (net i, snapshot k) of the file starts at `offset[i] + (k - 1) * n_weights[i]`.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.nets = pd.read_csv(directory / "nets.csv", dtype={name: str for name in PROPERTY_NAMES})
        self.offsets = self.nets["offset"].to_numpy(np.int64)
        self.lengths = self.nets["n_weights"].to_numpy(np.int64)
        self.conv = self.nets["weightn_conv"].to_numpy(np.int64)
        self._fd = os.open(directory / "weights.f32", os.O_RDONLY)
        self.size_bytes = os.fstat(self._fd).st_size

    def __len__(self) -> int:
        return len(self.nets)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()

    def row_start(self, net: np.ndarray | int, k: np.ndarray | int) -> np.ndarray:
        """Start (in values) of snapshot k (1-based) of net `net` in the flat file."""
        net = np.asarray(net)
        return self.offsets[net] + (np.asarray(k) - 1) * self.lengths[net]

    def gather(self, starts: np.ndarray, length: int, out: np.ndarray | None = None) -> np.ndarray:
        """`length` consecutive values from each start (in values), one row each."""
        starts = np.asarray(starts, dtype=np.int64)
        if out is None:
            out = np.empty((len(starts), length), dtype=np.float32)
        nbytes = length * 4
        for row, start in zip(out, starts, strict=True):
            if os.preadv(self._fd, [memoryview(row).cast("B")], int(start) * 4) != nbytes:
                raise DataError(f"{self.directory}: consolidated store is truncated")
        return out

    def snapshot(self, net: int, k: int) -> np.ndarray:
        """The whole flat vector of one snapshot."""
        return self.gather([int(self.row_start(net, k))], int(self.lengths[net]))[0]


def _store_key(nets: pd.DataFrame) -> str:
    text = "\n".join(f"{r.run_id} {r.sha256}" for r in nets.sort_values("run_id").itertuples())
    return hashlib.sha256(f"v{STORE_FORMAT}\n{text}".encode()).hexdigest()[:24]


def build_zoo(
    nets: pd.DataFrame, cache: ArtifactCache | None = None, workers: int = 8, progress: Any = None
) -> Zoo:
    """The consolidated store of these nets, built once and reused while it is complete."""
    cache = cache or ArtifactCache()
    nets = nets.reset_index(drop=True)
    directory = cache.root / "stores" / _store_key(nets)
    if (directory / "complete").is_file():
        zoo = Zoo(directory)
        expected = int((nets["prints"] * nets["n_weights"]).sum()) * 4
        if zoo.size_bytes == expected and zoo.nets["run_id"].tolist() == nets["run_id"].tolist():
            cache.stats.store_reused = True
            return zoo
        zoo.close()
        shutil.rmtree(directory, ignore_errors=True)  # truncated or stale: build again
    sizes = (nets["prints"] * nets["n_weights"]).to_numpy(np.int64)
    nets = nets.assign(offset=np.concatenate([[0], np.cumsum(sizes)[:-1]]))
    staging = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    fd = os.open(staging / "weights.f32", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, int(sizes.sum()) * 4)

        def consolidate(row: Any) -> None:
            path = cache.fetch(row.run_id, row.artifact_uri, row.sha256)
            array = np.load(path, mmap_mode="r")
            if array.shape != (row.prints, row.n_weights) or array.dtype != np.float32:
                raise DataError(f"run {row.run_id}: weights.npy has shape {array.shape}, {array.dtype}")
            os.pwrite(fd, memoryview(np.ascontiguousarray(array)).cast("B"), int(row.offset) * 4)
            if progress is not None:
                progress()

        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for future in [pool.submit(consolidate, row) for row in nets.itertuples()]:
                future.result()
    except BaseException:
        os.close(fd)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    os.close(fd)
    nets.drop(columns=["artifact_uri"]).to_csv(staging / "nets.csv", index=False)
    (staging / "complete").write_text(json.dumps({"format": STORE_FORMAT, "nets": len(nets)}))
    shutil.rmtree(directory, ignore_errors=True)
    staging.rename(directory)
    return Zoo(directory)


def region_bounds(lengths: np.ndarray, conv: np.ndarray, region: str) -> tuple[np.ndarray, np.ndarray]:
    """Per net, the [start, stop) of the region within a snapshot's vector."""
    lengths, conv = np.asarray(lengths, np.int64), np.asarray(conv, np.int64)
    if region == "all":
        return np.zeros_like(lengths), lengths.copy()
    if region == "conv":
        return np.zeros_like(lengths), conv.copy()
    if region == "fc":
        return conv.copy(), lengths.copy()
    raise ParameterError("region", f"{region!r} is not one of {', '.join(REGIONS)}")


def check_slice_length(nets: pd.DataFrame, used: np.ndarray, region: str, length: int) -> None:
    """Refuse a slice longer than the shortest region among the nets that will be used."""
    start, stop = region_bounds(nets["n_weights"], nets["weightn_conv"], region)
    span = (stop - start)[used]
    if length > span.min():
        shortest = used[int(np.argmin(span))]
        raise ParameterError(
            "slice_length",
            f"{length} is longer than the {region} part of run {nets['run_id'].iloc[shortest]} "
            f"({int(span.min())} weights)",
        )


def parse_k(text: str, prints: int) -> tuple[int, int]:
    """A snapshot range `a,b` (1-based, inclusive) within 1..prints; empty = all snapshots."""
    if not text.strip():
        return 1, prints
    try:
        parts = [int(p) for p in text.replace("..", ",").split(",")]
    except ValueError:
        raise ParameterError("K", f"{text!r} is not a range a,b") from None
    if len(parts) == 1:
        parts = parts * 2
    a, b = parts if len(parts) == 2 else (0, 0)
    if not 1 <= a <= b <= prints:
        raise ParameterError("K", f"{text!r} is outside 1..{prints} (the fewest snapshots of a selected net)")
    return a, b


@dataclass(frozen=True)
class Split:
    """Which nets train, validate and test one property (balanced, by net)."""

    prop: str
    classes: tuple[str, ...]  # empty for the learning rate (regression)
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    labels: np.ndarray  # per net of the zoo: class index (or the learning rate)

    @property
    def is_regression(self) -> bool:
        return not self.classes

    @property
    def chance(self) -> float:
        return 1.0 / len(self.classes) if self.classes else float("nan")


def split_nets(
    nets: pd.DataFrame, prop: str, test_fraction: float, seed: int, valid_fraction: float = 0.1
) -> Split:
    """Split by net, never by snapshot. Classification: every class keeps the same number of nets
    in train and in test (the smallest class sets it), so chance is exactly 1/C."""
    rng = np.random.default_rng([seed, PROPERTY_NAMES.index(prop)])
    values = nets[prop].astype(str).to_numpy()
    if prop == "lrate":
        order = rng.permutation(len(nets))
        n_test = max(1, round(len(order) * test_fraction))
        test, groups = order[:n_test], [order[n_test:]]
        labels = values.astype(np.float64)
        classes: tuple[str, ...] = ()
    else:
        classes = tuple(sorted(set(values), key=_natural))
        if len(classes) < 2:
            raise ParameterError("props", f"{prop} has a single class ({classes[0]}) in the selection")
        members = [np.flatnonzero(values == c) for c in classes]
        per_class = min(len(m) for m in members)
        if per_class < 2:
            raise ParameterError(
                "props", f"{prop}: a class has {per_class} net(s); need 2 per class for train and test"
            )
        n_test = min(per_class - 1, max(1, round(per_class * test_fraction)))
        picks = [rng.permutation(m)[:per_class] for m in members]
        test = np.concatenate([p[:n_test] for p in picks])
        groups = [p[n_test:] for p in picks]
        labels = np.array([classes.index(v) for v in values], dtype=np.int64)
    # Validation nets come from each class's training nets, never leaving a class without one.
    n_valid = [int(len(g) * valid_fraction) if len(g) > 1 else 0 for g in groups]
    valid = np.concatenate([g[:n] for g, n in zip(groups, n_valid, strict=True)])
    train = np.concatenate([g[n:] for g, n in zip(groups, n_valid, strict=True)])
    return Split(prop, classes, np.sort(train), np.sort(valid).astype(np.int64), np.sort(test), labels)


def _natural(value: str) -> tuple[int, float | str]:
    try:
        return (0, float(value))
    except ValueError:
        return (1, value)


def varying_properties(nets: pd.DataFrame, names: Sequence[str]) -> tuple[list[str], list[str]]:
    """The requested properties that vary in the selection, and those that do not."""
    varying = [n for n in names if nets[n].astype(str).nunique() > 1]
    return varying, [n for n in names if n not in varying]
