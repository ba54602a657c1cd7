"""The zoo: the selected nets' snapshots behind one flat float32 address space, and its store.

Every artifact is verified against its run's digest (`nws.zoo.cache`) on every build, before
anything reads from the zoo. The index that verification gives is written as a store
(`<cache>/stores/<key>/nets.csv` and a `complete` marker) under a temporary name and swapped in by
renames under a file lock, so concurrent calls share a cache and a crash never leaves a
half-written store that a later call would pick up. Training reads slices from the files with
positioned reads: the weights are never all held in RAM, and nothing is copied a second time on
disk (the published dataset is hundreds of gigabytes).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from nws.errors import DataError
from nws.space import PROPERTY_NAMES
from nws.zoo.cache import ArtifactCache, check_run_id, report_repair

STORE_FORMAT = 3  # 3: the index is verified against the artifacts on every build


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
        self.nets = read_store_index(
            io.StringIO(index) if index is not None else directory / "nets.csv", directory
        )
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


def read_store_index(source: Any, directory: Path) -> pd.DataFrame:
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
                report_repair(f"zoo cache: store {directory} is {state} ({reason}); rebuilt")
                cache.stats.add("repaired")
            _write_store(directory, index, len(nets))
    return Zoo(directory, index)
