"""The zoo: the meta-dataset of many nets' snapshots, selected by an MLflow run query.

Snapshot artifacts are fetched in parallel (downloaded into a local cache keyed by run id when
the artifact store is remote, read in place when it is local), verified once against the digest
tag the net's run carries, and indexed into one store: a single flat address space over all
selected snapshots. Training reads slices from it with positioned reads, so the weights are never
all held in RAM, and nothing is copied a second time on disk (the published dataset is hundreds of
gigabytes). A store's index is written under a temporary name and renamed when complete, so a
crash never leaves a half-written store that a later call would pick up.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from nws import tracking
from nws.errors import DataError, ParameterError
from nws.params import param
from nws.space import PROPERTY_NAMES

REGIONS = ("all", "conv", "fc")
BUILTIN_FILTER = (
    f"tags.`{tracking.TAG_ROLE}` = 'net' and attributes.status = 'FINISHED' "
    f"and tags.`{tracking.TAG_SNAPSHOTS}` = '{tracking.SNAPSHOTS_COMPLETE}'"
)
STORE_FORMAT = 2


def default_cache_dir() -> Path:
    """`$NWS_CACHE_DIR`, else `~/.cache/nws/zoo`."""
    return Path(os.environ.get("NWS_CACHE_DIR") or Path.home() / ".cache" / "nws" / "zoo")


@dataclass(frozen=True)
class Selection:
    """Which net runs form the zoo: the built-in condition AND the user's filter. The
    parameters of every entry point that selects nets (`train`, `export_nws`) start with these."""

    experiment: str = param("", "MLflow experiments to select nets from, comma list (default: all)")
    filter: str = param("", "MLflow search filter, AND-ed with: finished net runs with complete snapshots")
    min_test_accuracy: float = param(0.0, "leave out nets below this test accuracy")

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
            "digest": tags[tracking.TAG_WEIGHTS_DIGEST],
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


def _digest_bytes(data: memoryview | bytes) -> str:
    import xxhash

    return xxhash.xxh3_128(data).hexdigest()


class _MappedArray:
    """The data of an .npy file, mapped and pre-faulted (MAP_POPULATE): hashing it and writing it
    out both read the page cache directly, in one pass, without a copy through Python memory."""

    def __init__(self, path: Path, populate: bool = True) -> None:
        import mmap

        try:
            header = np.load(path, mmap_mode="r")  # parses the header; maps nothing we keep
        except ValueError as e:
            raise DataError(f"{path}: not a readable .npy file ({e})") from None
        self.offset, self.shape, self.dtype = header.offset, header.shape, header.dtype
        self.fortran = not header.flags.c_contiguous
        self.nbytes = int(header.nbytes)
        del header
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size < self.offset + self.nbytes:
                raise DataError(f"{path}: truncated .npy file")
            flags = mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0)
            self._map = mmap.mmap(f.fileno(), 0, flags=flags, prot=mmap.PROT_READ) if self.nbytes else None
        self.data = memoryview(self._map)[self.offset : self.offset + self.nbytes] if self._map else b""

    def close(self) -> None:
        if self._map is not None:
            self.data.release()
            self._map.close()
            self._map = None

    def __enter__(self) -> _MappedArray:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
    """Snapshot artifacts by run id, verified once against the run's digest tag.

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

    def _is_verified(self, run_id: str, path: Path, digest: str) -> bool:
        try:
            record = json.loads(self._record_path(run_id).read_text())
            stat = path.stat()
        except (OSError, ValueError):
            return False
        return record == {"digest": digest, "path": str(path), "size": stat.st_size,
                          "mtime_ns": stat.st_mtime_ns}  # fmt: skip

    def _remember(self, run_id: str, path: Path, digest: str) -> None:
        record = self._record_path(run_id)
        record.parent.mkdir(parents=True, exist_ok=True)
        stat = path.stat()
        tmp = record.with_suffix(f".tmp-{os.getpid()}-{threading.get_ident()}")
        tmp.write_text(json.dumps({"digest": digest, "path": str(path), "size": stat.st_size,
                                   "mtime_ns": stat.st_mtime_ns}))  # fmt: skip
        tmp.replace(record)

    def locate(self, run_id: str, artifact_uri: str, digest: str) -> tuple[Path, bool]:
        """The local path of `snapshots/weights.npy` (downloaded if the store is remote and the
        cached copy is not verified), and whether it is verified already."""
        if _is_local(artifact_uri):
            path = _local_path(artifact_uri) / tracking.WEIGHTS_ARTIFACT
        else:
            path = self.root / "runs" / run_id / tracking.WEIGHTS_ARTIFACT
        if self._is_verified(run_id, path, digest):
            self.stats.add("reused")
            return path, True
        if not _is_local(artifact_uri):
            self._download(artifact_uri, path.parent.parent)
        return path, False

    def fetch(self, run_id: str, artifact_uri: str, digest: str) -> Path:
        """The local path of a verified `snapshots/weights.npy`."""
        path, verified = self.locate(run_id, artifact_uri, digest)
        if not verified:
            self.verified_copy(run_id, artifact_uri, digest, path, lambda data: None)
        return path

    def verified_copy(self, run_id: str, artifact_uri: str, digest: str, path: Path, use: Any) -> None:
        """Map the file, check its digest, hand its data to `use`; a remote artifact that fails is
        downloaded once more before it is reported."""
        where = "in the artifact store" if _is_local(artifact_uri) else "after download"
        for attempt in (1, 2):
            try:
                with _MappedArray(path) as array:
                    if _digest_bytes(array.data) != digest:
                        raise DataError(
                            f"run {run_id}: snapshot artifact is corrupted {where} (its digest does not "
                            f"match the run's {tracking.TAG_WEIGHTS_DIGEST} tag)"
                        )
                    use(array)
            except (DataError, OSError) as error:
                if attempt == 2 or _is_local(artifact_uri):
                    if isinstance(error, OSError):
                        raise DataError(
                            f"run {run_id}: snapshot artifact unreadable {where} ({error})"
                        ) from None
                    raise
                self._download(artifact_uri, path.parent.parent)
                continue
            self.stats.add("verified")
            self._remember(run_id, path, digest)
            return

    def _download(self, artifact_uri: str, target: Path) -> None:
        import mlflow

        (target / "snapshots").mkdir(parents=True, exist_ok=True)
        mlflow.artifacts.download_artifacts(
            artifact_uri=f"{artifact_uri}/{tracking.WEIGHTS_ARTIFACT}", dst_path=str(target / "snapshots")
        )
        self.stats.add("downloaded")


class Zoo:
    """Every selected net's snapshots behind one flat float32 address space, and a table of nets.

    Row (net i, snapshot k) starts at `offset[i] + (k - 1) * n_weights[i]`. The values are read in
    place from the verified `weights.npy` files (the local artifact store, or the copies an
    `mlflow server` sent into the cache) with positioned reads, so a zoo never has to fit in RAM
    and is never copied a second time on disk.
    """

    MAX_OPEN_FILES = 256

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        text = {name: str for name in (*PROPERTY_NAMES, "subset", "campaign", "split", "path")}
        self.nets = pd.read_csv(directory / "nets.csv", dtype=text, keep_default_na=False, na_values={})
        self.nets["test_accuracy"] = pd.to_numeric(self.nets["test_accuracy"], errors="coerce")
        self.offsets = self.nets["offset"].to_numpy(np.int64)
        self.lengths = self.nets["n_weights"].to_numpy(np.int64)
        self.conv = self.nets["weightn_conv"].to_numpy(np.int64)
        self.ends = self.offsets + self.nets["prints"].to_numpy(np.int64) * self.lengths
        self.data_offsets = self.nets["data_offset"].to_numpy(np.int64)
        self.size_bytes = int(self.ends[-1]) * 4 if len(self.ends) else 0
        self._files: OrderedDict[int, int] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.nets)

    def is_current(self) -> bool:
        """Every file is still the one verified (same size and modification time)."""
        for row in self.nets.itertuples():
            try:
                stat = os.stat(row.path)
            except OSError:
                return False
            if (stat.st_size, stat.st_mtime_ns) != (row.file_size, row.mtime_ns):
                return False
        return True

    def _fd(self, net: int) -> int:
        fd = self._files.get(net)
        if fd is not None:
            self._files.move_to_end(net)
            return fd
        if len(self._files) >= self.MAX_OPEN_FILES:
            os.close(self._files.popitem(last=False)[1])
        fd = self._files[net] = os.open(self.nets["path"].iloc[net], os.O_RDONLY)
        return fd

    def close(self) -> None:
        with self._lock:
            while self._files:
                os.close(self._files.popitem()[1])

    def __del__(self) -> None:
        self.close()

    def row_start(self, net: np.ndarray | int, k: np.ndarray | int) -> np.ndarray:
        """Start (in values) of snapshot k (1-based) of net `net` in the flat address space."""
        net = np.asarray(net)
        return self.offsets[net] + (np.asarray(k) - 1) * self.lengths[net]

    def gather(self, starts: np.ndarray, length: int, out: np.ndarray | None = None) -> np.ndarray:
        """`length` consecutive values from each start (in values), one row each."""
        starts = np.asarray(starts, dtype=np.int64)
        if out is None:
            out = np.empty((len(starts), length), dtype=np.float32)
        nets = np.searchsorted(self.offsets, starts, side="right") - 1
        if len(starts) and ((nets < 0).any() or (starts + length > self.ends[nets]).any()):
            raise ValueError("a slice reaches past the snapshots of its net")
        positions = self.data_offsets[nets] + (starts - self.offsets[nets]) * 4
        nbytes = length * 4
        with self._lock:
            for row, net, position in zip(out, nets, positions, strict=True):
                if os.preadv(self._fd(int(net)), [memoryview(row).cast("B")], int(position)) != nbytes:
                    raise DataError(f"run {self.nets['run_id'].iloc[net]}: snapshot file is truncated")
        return out

    def snapshot(self, net: int, k: int) -> np.ndarray:
        """The whole flat vector of one snapshot."""
        return self.gather([int(self.row_start(net, k))], int(self.lengths[net]))[0]


def _store_key(nets: pd.DataFrame) -> str:
    text = "\n".join(f"{r.run_id} {r.digest}" for r in nets.sort_values("run_id").itertuples())
    return hashlib.sha256(f"v{STORE_FORMAT}\n{text}".encode()).hexdigest()[:24]


def build_zoo(
    nets: pd.DataFrame, cache: ArtifactCache | None = None, workers: int = 8, progress: Any = None
) -> Zoo:
    """The zoo of these nets: every artifact fetched and verified once, then indexed; the index
    is reused while every file it points to is unchanged."""
    cache = cache or ArtifactCache()
    nets = nets.reset_index(drop=True)
    directory = cache.root / "stores" / _store_key(nets)
    if (directory / "complete").is_file():
        zoo = Zoo(directory)
        if zoo.nets["run_id"].tolist() == nets["run_id"].tolist() and zoo.is_current():
            cache.stats.store_reused = True
            return zoo
        zoo.close()
    sizes = (nets["prints"] * nets["n_weights"]).to_numpy(np.int64)
    located: list[dict[str, Any]] = [{} for _ in range(len(nets))]

    def index(i: int, row: Any) -> None:
        def check(array: _MappedArray) -> None:
            if array.shape != (row.prints, row.n_weights) or array.dtype != np.float32 or array.fortran:
                raise DataError(f"run {row.run_id}: weights.npy has shape {array.shape}, {array.dtype}")
            located[i]["data_offset"] = array.offset

        path, verified = cache.locate(row.run_id, row.artifact_uri, row.digest)
        if verified:
            with _MappedArray(path, populate=False) as array:
                check(array)
        else:
            cache.verified_copy(row.run_id, row.artifact_uri, row.digest, path, check)
        stat = os.stat(path)
        located[i].update(path=str(path), file_size=stat.st_size, mtime_ns=stat.st_mtime_ns)
        if progress is not None:
            progress()

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for future in [pool.submit(index, i, row) for i, row in enumerate(nets.itertuples())]:
            future.result()
    table = nets.drop(columns=["artifact_uri"]).assign(
        offset=np.concatenate([[0], np.cumsum(sizes)[:-1]]), **pd.DataFrame(located).to_dict("series")
    )
    staging = directory.with_name(f"{directory.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    table.to_csv(staging / "nets.csv", index=False)
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


SPLITS = ("random", "published")


def split_nets(
    nets: pd.DataFrame,
    prop: str,
    test_fraction: float,
    seed: int,
    valid_fraction: float = 0.1,
    published: bool = False,
) -> Split:
    """Split by net, never by snapshot. Classification: every class keeps the same number of nets
    in train and in test (the smallest class sets it), so chance is exactly 1/C.

    `published` takes train and test from the nets' `nws.split` tags (e.g. the published NWS
    train/test CSVs) instead of drawing them; each part is balanced the same way."""
    rng = np.random.default_rng([seed, PROPERTY_NAMES.index(prop)])
    values = nets[prop].astype(str).to_numpy()
    parts = _published_parts(nets) if published else None
    if prop == "lrate":
        classes: tuple[str, ...] = ()
        labels = values.astype(np.float64)
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
        classes = tuple(sorted(set(values), key=_natural))
        if len(classes) < 2:
            raise ParameterError("props", f"{prop} has a single class ({classes[0]}) in the selection")
        labels = np.array([classes.index(v) for v in values], dtype=np.int64)
        if parts is not None:
            test, groups = _balanced_published(prop, values, classes, parts, rng)
        else:
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
    # Validation nets come from each class's training nets, never leaving a class without one.
    n_valid = [int(len(g) * valid_fraction) if len(g) > 1 else 0 for g in groups]
    valid = np.concatenate([g[:n] for g, n in zip(groups, n_valid, strict=True)])
    train = np.concatenate([g[n:] for g, n in zip(groups, n_valid, strict=True)])
    return Split(prop, classes, np.sort(train), np.sort(valid).astype(np.int64), np.sort(test), labels)


def _published_parts(nets: pd.DataFrame) -> np.ndarray:
    parts = nets["split"].fillna("").astype(str).to_numpy()
    unknown = int(np.sum(~np.isin(parts, ["train", "test"])))
    if unknown:
        raise ParameterError("split", f"{unknown} selected nets carry no nws.split tag of train or test")
    if not (parts == "test").any() or not (parts == "train").any():
        raise ParameterError("split", "the selection needs nets tagged train and nets tagged test")
    return parts


def _balanced_published(
    prop: str, values: np.ndarray, classes: tuple[str, ...], parts: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, list[np.ndarray]]:
    chosen = {}
    for part in ("train", "test"):
        members = [rng.permutation(np.flatnonzero((values == c) & (parts == part))) for c in classes]
        per_class = min(len(m) for m in members)
        if per_class < 1:
            raise ParameterError("props", f"{prop}: a class has no {part} net in the published split")
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
