"""The snapshot cache: every selected net's `snapshots/weights.npy`, hashed against its run's
digest tag whenever it is used. A local artifact store is read in place; from an `mlflow server`
the files are downloaded into `<cache>/runs/<run id>/`, and a damaged copy there is reported in
one line and downloaded again (the cache is disposable). A damaged artifact in the artifact store
itself is a DataError naming its run.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nws.errors import DataError
from nws.tracking.tags import TAG_WEIGHTS_DIGEST, WEIGHTS_ARTIFACT


def default_cache_dir() -> Path:
    """`$NWS_CACHE_DIR`, else `~/.cache/nws/zoo`."""
    return Path(os.environ.get("NWS_CACHE_DIR") or Path.home() / ".cache" / "nws" / "zoo")


def _is_local(artifact_uri: str) -> bool:
    from urllib.parse import urlparse

    return urlparse(artifact_uri).scheme in ("", "file")


def _local_path(uri: str) -> Path:
    from urllib.parse import unquote, urlparse

    return Path(unquote(urlparse(uri).path)) if uri.startswith("file:") else Path(uri)


def _digest_bytes(data: memoryview | bytes) -> str:
    import xxhash

    return xxhash.xxh3_128(data).hexdigest()


def report_repair(line: str) -> None:
    """A repair of the cache, in one line: the cache is disposable, so damage there is not an error."""
    print(line, file=sys.stderr, flush=True)


PLAIN_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,255}")
"""MLflow's own rule for a run id (mlflow.utils.validation), restricted to ASCII: anything else is
refused before it becomes part of a path, so a run id such as `../../x` cannot leave the cache
(or an export's directory)."""


def check_run_id(run_id: str) -> str:
    """The run id, if it is a plain MLflow run id (letters, digits, `_` and `-`)."""
    if not isinstance(run_id, str) or PLAIN_RUN_ID.fullmatch(run_id) is None:
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


DIGEST_MISMATCH = f"its digest does not match the run's {TAG_WEIGHTS_DIGEST} tag"


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
        cached = self.run_dir(run_id) / WEIGHTS_ARTIFACT
        if _is_local(artifact_uri):
            path = _local_path(artifact_uri) / WEIGHTS_ARTIFACT
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
            report_repair(f"zoo cache: run {run_id}: the cached copy of its snapshots is damaged ({why}); "
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
                    artifact_uri=f"{artifact_uri}/{WEIGHTS_ARTIFACT}", dst_path=private
                )
                os.replace(got, path)
        except (MlflowException, OSError) as e:
            reason = (str(getattr(e, "message", "") or e) or type(e).__name__).splitlines()[0]
            raise DataError(f"run {run_id}: cannot download its snapshots ({reason})") from None
        self.stats.add("downloaded")
