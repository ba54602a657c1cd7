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

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from nws.commands.options import param
from nws.errors import DataError, ParameterError
from nws.space import PROPERTY_NAMES
from nws.tracking import tags as tracking

REGIONS = ("all", "conv", "fc")
BUILTIN_FILTER = (
    f"tags.`{tracking.TAG_ROLE}` = 'net' and attributes.status = 'FINISHED' "
    f"and tags.`{tracking.TAG_SNAPSHOTS}` = '{tracking.SNAPSHOTS_COMPLETE}'"
)
STORE_FORMAT = 3  # 3: the index is verified against the artifacts on every build


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


def _report(line: str) -> None:
    """A repair of the cache, in one line: the cache is disposable, so damage there is not an error."""
    print(line, file=sys.stderr, flush=True)


# MLflow's own rule for a run id (mlflow.utils.validation), restricted to ASCII: anything else is
# refused before it becomes part of a cache path, so a run id such as `../../x` cannot leave it.
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,255}")


def check_run_id(run_id: str) -> str:
    """The run id, if it is a plain MLflow run id (letters, digits, `_` and `-`)."""
    if not isinstance(run_id, str) or _RUN_ID.fullmatch(run_id) is None:
        raise DataError(f"run {run_id!r}: not a plain MLflow run id; refused as a cache path")
    return run_id


class _Unreadable(Exception):
    """An .npy file that cannot be used; the caller names the run and where the file is."""


_NPY_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


class _MappedArray:
    """The data of an .npy file, mapped: hashing it reads the page cache directly, in one pass,
    without a copy through Python memory. The kernel is asked to read the whole file ahead
    (MADV_WILLNEED) while the hash runs; pre-faulting it instead (MAP_POPULATE) measured slower,
    both from disk and from the page cache (benchmarks/zoo_build.py)."""

    def __init__(self, path: Path) -> None:
        import mmap

        self._map = None
        with open(path, "rb") as f:
            try:
                version = np.lib.format.read_magic(f)
                if version not in _NPY_HEADERS:
                    raise ValueError(f".npy format version {version} is not supported")
                self.shape, self.fortran, self.dtype = _NPY_HEADERS[version](f)
            except ValueError as e:  # short file, wrong magic string or malformed header
                raise _Unreadable(f"not a readable .npy file: {e}") from None
            if self.dtype.hasobject:
                raise _Unreadable("an .npy file of Python objects")
            self.offset = f.tell()
            self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
            size = os.fstat(f.fileno()).st_size
            if size < self.offset + self.nbytes:
                raise _Unreadable(
                    f"truncated .npy file: {size} bytes, its header needs {self.offset + self.nbytes}"
                )
            if self.nbytes:
                self._map = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
                if hasattr(mmap, "MADV_WILLNEED"):
                    self._map.madvise(mmap.MADV_WILLNEED)
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


DIGEST_MISMATCH = f"its digest does not match the run's {tracking.TAG_WEIGHTS_DIGEST} tag"


def _check_file(path: Path, digest: str, shape: tuple[int, int] | None) -> tuple[int, str, str]:
    """Hash the array data of `path` against `digest`: its data offset, and what is wrong with it
    ("is corrupted" or "unreadable", and why) or ("", "")."""
    try:
        with _MappedArray(path) as array:
            if shape is not None and (array.shape, array.dtype, array.fortran) != (shape, np.float32, False):
                return 0, "unreadable", f"an array of {array.shape}, {array.dtype}, not {shape}, float32"
            if _digest_bytes(array.data) != digest:
                return 0, "is corrupted", DIGEST_MISMATCH
            return array.offset, "", ""
    except _Unreadable as e:
        return 0, "unreadable", str(e)
    except OSError as e:
        return 0, "unreadable", str(e.strerror or e)


@dataclass
class FetchStats:
    downloaded: int = 0  # artifacts fetched from an `mlflow server` into the cache
    verified: int = 0  # artifacts hashed against their run's digest tag (all of them, every call)
    reused: int = 0  # copies downloaded earlier, found intact and used again
    repaired: int = 0  # damaged cache entries (downloaded copies, stores) reported and rebuilt
    store_reused: bool = False  # the store's index on disk was intact and up to date
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, name: str) -> None:
        with self.lock:
            setattr(self, name, getattr(self, name) + 1)


class ArtifactCache:
    """Snapshot artifacts by run id, hashed against the run's digest tag whenever they are used.

    A local artifact store is read in place (nothing copied); a remote one (an `mlflow server`)
    is downloaded into `<cache>/runs/<run_id>/`, and a copy there is downloaded again when it fails
    its digest. Nothing is trusted from an earlier call: a file changed in place keeps its size and
    can be given back its modification time, so only its hash tells.
    """

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root or default_cache_dir())
        self.stats = FetchStats()

    def run_dir(self, run_id: str) -> Path:
        """`<cache>/runs/<run_id>`, for a plain MLflow run id only."""
        return self.root / "runs" / check_run_id(run_id)

    def fetch(self, run_id: str, artifact_uri: str, digest: str) -> Path:
        """The local path of `snapshots/weights.npy`, hashed against the digest now."""
        return self.verify(run_id, artifact_uri, digest)[0]

    def verify(
        self, run_id: str, artifact_uri: str, digest: str, shape: tuple[int, int] | None = None
    ) -> tuple[Path, int]:
        """The local path of the run's `snapshots/weights.npy` and the offset of its data, after
        checking its shape (if given) and its digest. A damaged copy in the cache is reported and
        downloaded again; a damaged artifact in the artifact store is a DataError naming the run."""
        cached = self.run_dir(run_id) / tracking.WEIGHTS_ARTIFACT
        if _is_local(artifact_uri):
            path = _local_path(artifact_uri) / tracking.WEIGHTS_ARTIFACT
            offset, problem, why = _check_file(path, digest, shape)
            if problem:
                raise DataError(f"run {run_id}: snapshot artifact {problem} in the artifact store ({why})")
            self.stats.add("verified")
            return path, offset
        if cached.exists():
            offset, problem, why = _check_file(cached, digest, shape)
            if not problem:
                self.stats.add("reused")
                self.stats.add("verified")
                return cached, offset
            _report(f"zoo cache: run {run_id}: the cached copy of its snapshots is damaged ({why}); "
                    "downloading it again")  # fmt: skip
            self.stats.add("repaired")
        self._download(run_id, artifact_uri, cached)
        offset, problem, why = _check_file(cached, digest, shape)
        if problem:
            raise DataError(f"run {run_id}: snapshot artifact {problem} after download ({why})")
        self.stats.add("verified")
        return cached, offset

    def _download(self, run_id: str, artifact_uri: str, path: Path) -> None:
        """Download into a private directory, then rename over the cached copy: a process that
        reads the old copy keeps it whole, and none ever sees a half-written one."""
        import mlflow
        from mlflow.exceptions import MlflowException

        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with tempfile.TemporaryDirectory(prefix=".download-", dir=path.parent) as private:
                got = mlflow.artifacts.download_artifacts(
                    artifact_uri=f"{artifact_uri}/{tracking.WEIGHTS_ARTIFACT}", dst_path=private
                )
                os.replace(got, path)
        except (MlflowException, OSError) as e:
            reason = (str(getattr(e, "message", "") or e) or type(e).__name__).splitlines()[0]
            raise DataError(f"run {run_id}: cannot download its snapshots ({reason})") from None
        self.stats.add("downloaded")


# The columns a store's nets.csv needs, besides the nets' properties and tags.
INDEX_COLUMNS = ("run_id", "offset", "n_weights", "weightn_conv", "prints", "data_offset", "path",
                 "test_accuracy")  # fmt: skip
_CACHE_COLUMNS = ("offset", "data_offset", "path")  # what the cache, not the tracking store, gives a row


class Zoo:
    """Every selected net's snapshots behind one flat float32 address space, and a table of nets.

    Row (net i, snapshot k) starts at `offset[i] + (k - 1) * n_weights[i]`. The values are read in
    place from the `weights.npy` files (the local artifact store, or the copies an `mlflow server`
    sent into the cache) with positioned reads, so a zoo never has to fit in RAM and is never
    copied a second time on disk. `build_zoo` hands over the index it has just verified; opening a
    store's directory alone reads its `nets.csv` as it is.
    """

    MAX_OPEN_FILES = 256

    def __init__(self, directory: Path, index: str | None = None) -> None:
        self.directory = directory
        self.nets = read_index(io.StringIO(index) if index is not None else directory / "nets.csv", directory)
        self.offsets = self.nets["offset"].to_numpy(np.int64)
        self.lengths = self.nets["n_weights"].to_numpy(np.int64)
        self.conv = self.nets["weightn_conv"].to_numpy(np.int64)
        self.ends = self.offsets + self.nets["prints"].to_numpy(np.int64) * self.lengths
        self.data_offsets = self.nets["data_offset"].to_numpy(np.int64)
        self.size_bytes = int(self.ends[-1]) * 4 if len(self.ends) else 0
        self._files: OrderedDict[int, int] = OrderedDict()
        self._lock = threading.Lock()
        # Not __del__: a finalizer runs before the interpreter tears its modules down, and only
        # for a Zoo whose __init__ got this far.
        weakref.finalize(self, _close_files, self._files)

    def __len__(self) -> int:
        return len(self.nets)

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
            _close_files(self._files)

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


def _close_files(files: OrderedDict[int, int]) -> None:
    while files:
        os.close(files.popitem()[1])


def read_index(source: Any, directory: Path) -> pd.DataFrame:
    """A store's table of nets (`nets.csv`), its text columns kept as text; a DataError naming
    the store if it is not one."""
    text = {
        name: str for name in (*PROPERTY_NAMES, "subset", "campaign", "split", "path", "run_id", "digest")
    }
    try:
        nets = pd.read_csv(source, dtype=text, keep_default_na=False, na_values={})
        missing = [c for c in INDEX_COLUMNS if c not in nets.columns]
        if missing:
            raise ValueError(f"no column {', '.join(missing)}")
        for column in ("offset", "n_weights", "weightn_conv", "prints", "data_offset"):
            nets[column] = nets[column].astype(np.int64)
    except (OSError, ValueError) as e:  # includes UnicodeDecodeError and pandas' parser errors
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{directory}: not a zoo store ({type(e).__name__}: {reason})") from None
    nets["test_accuracy"] = pd.to_numeric(nets["test_accuracy"], errors="coerce")
    return nets


def _store_key(nets: pd.DataFrame) -> str:
    text = "\n".join(f"{r.run_id} {r.digest}" for r in nets.sort_values("run_id").itertuples())
    return hashlib.sha256(f"v{STORE_FORMAT}\n{text}".encode()).hexdigest()[:24]


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """An exclusive lock between processes (`flock`, released by the kernel if the holder dies)."""
    import fcntl

    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _store_problem(directory: Path, index: str, n_nets: int) -> tuple[str, str]:
    """How the store on disk falls short of the index just verified: ("", "") when it does not,
    else ("damaged" or "out of date", the reason)."""
    if not directory.exists():
        return "missing", ""
    try:
        marker = json.loads((directory / "complete").read_bytes())
    except FileNotFoundError:
        return "damaged", "no complete marker"
    except (OSError, ValueError) as e:
        return "damaged", f"complete marker unreadable: {type(e).__name__}"
    if marker != {"format": STORE_FORMAT, "nets": n_nets}:
        return (
            "damaged",
            f"complete marker {json.dumps(marker)[:60]} is not format {STORE_FORMAT}, {n_nets} nets",
        )
    try:
        stored = (directory / "nets.csv").read_bytes()
    except OSError as e:
        return "damaged", f"nets.csv {e.strerror or e}".lower()
    if stored == index.encode():
        return "", ""
    try:
        old = pd.read_csv(io.BytesIO(stored), dtype=str, keep_default_na=False)
    except ValueError as e:  # includes UnicodeDecodeError and pandas' parser errors
        return "damaged", f"nets.csv unreadable: {type(e).__name__}"
    new = pd.read_csv(io.StringIO(index), dtype=str, keep_default_na=False)
    if list(old.columns) != list(new.columns) or len(old) != len(new):
        shape, wanted = (len(old), len(old.columns)), (len(new), len(new.columns))
        return (
            "damaged",
            f"nets.csv has {shape[0]} rows of {shape[1]} columns, not {wanted[0]} of {wanted[1]}",
        )
    for column in new.columns:
        differs = np.flatnonzero(old[column].to_numpy() != new[column].to_numpy())
        if len(differs):
            i = int(differs[0])
            state = "damaged" if column in (*_CACHE_COLUMNS, "run_id") else "out of date"
            was, now = old[column][i][:40], new[column][i][:40]
            return state, f"nets.csv gives run {new['run_id'][i]} {column} {was!r}, not {now!r}"
    return "damaged", "nets.csv differs in its bytes"


def _write_store(directory: Path, index: str, n_nets: int) -> None:
    """Write the store under a private name, then swap it in by renames; called with the store's
    lock held, so no other process reads or writes it meanwhile, and a crash leaves either the
    old store, the new one, or none (rebuilt next time): never a partial one."""
    for leftover in (*directory.parent.glob(f"{directory.name}.tmp-*"),
                     *directory.parent.glob(f"{directory.name}.old-*")):  # fmt: skip
        shutil.rmtree(leftover, ignore_errors=True)  # of a build that crashed
    tag = f"{os.getpid()}-{threading.get_ident()}"
    staging = directory.with_name(f"{directory.name}.tmp-{tag}")
    staging.mkdir()
    (staging / "nets.csv").write_text(index)
    (staging / "complete").write_text(json.dumps({"format": STORE_FORMAT, "nets": n_nets}))
    old = directory.with_name(f"{directory.name}.old-{tag}")
    if directory.exists():
        directory.rename(old)
    staging.rename(directory)
    shutil.rmtree(old, ignore_errors=True)


def build_zoo(
    nets: pd.DataFrame, cache: ArtifactCache | None = None, workers: int = 8, progress: Any = None
) -> Zoo:
    """The zoo of these nets. Every artifact is hashed against its run's digest tag on every call
    (in parallel), before anything reads from the zoo, so no net is ever read from a file that
    changed since it was sampled. The index that verification gives is compared with the store on
    disk, which is rebuilt (with a one-line report) if it is damaged or out of date."""
    cache = cache or ArtifactCache()
    nets = nets.reset_index(drop=True)
    for run_id in nets["run_id"]:
        check_run_id(run_id)
    sizes = (nets["prints"] * nets["n_weights"]).to_numpy(np.int64)
    located: list[dict[str, Any]] = [{} for _ in range(len(nets))]

    def locate(i: int, row: Any) -> None:
        path, offset = cache.verify(row.run_id, row.artifact_uri, row.digest, (row.prints, row.n_weights))
        located[i] = {"path": str(path), "data_offset": offset}
        if progress is not None:
            progress()

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = [pool.submit(locate, i, row) for i, row in enumerate(nets.itertuples())]
        try:
            for future in futures:
                future.result()
        except BaseException:
            pool.shutdown(cancel_futures=True)  # the first bad artifact ends the build: hash no more
            raise
    table = nets.drop(columns=["artifact_uri"]).assign(
        offset=np.concatenate([[0], np.cumsum(sizes)[:-1]]), **pd.DataFrame(located).to_dict("series")
    )
    index = table.to_csv(index=False)
    directory = cache.root / "stores" / _store_key(nets)
    directory.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(directory.with_name(f"{directory.name}.lock")):
        state, reason = _store_problem(directory, index, len(nets))
        if not state:
            cache.stats.store_reused = True
        else:
            if state != "missing":
                _report(f"zoo cache: store {directory} is {state} ({reason}); rebuilt")
                cache.stats.add("repaired")
            _write_store(directory, index, len(nets))
    return Zoo(directory, index)


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
