"""Readers of the official file formats of the five paper datasets.

Each reader takes the dataset's directory (`<data_dir>/<name>`), finds the official files anywhere
below it (so both an extracted archive and its inner folder work) and returns uint8 images at their
native size with integer labels 0..9.

* MNIST, Fashion-MNIST: IDX files `train-images-idx3-ubyte[.gz]`, `train-labels-idx1-ubyte[.gz]`,
  `t10k-images-idx3-ubyte[.gz]`, `t10k-labels-idx1-ubyte[.gz]`.
* CIFAR-10: the python version, `data_batch_1..5` and `test_batch` (pickled dicts), extracted or
  inside `cifar-10-python.tar.gz`.
* SVHN: format 2 (cropped digits), `train_32x32.mat` and `test_32x32.mat`; label 10 means digit 0.
* STL-10: the binary version, `train_X.bin`, `train_y.bin`, `test_X.bin`, `test_y.bin`
  (images column-major 3x96x96, labels 1..10).
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
import tarfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

import numpy as np

from nws.errors import DataError

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
CIFAR10_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
SVHN_FILES = ["train_32x32.mat", "test_32x32.mat"]
STL10_FILES = ["train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin"]


class MissingFilesError(DataError):
    """The official files of a dataset are not there (a download may fetch them)."""


def find_file(root: Path, names: Iterable[str]) -> Path | None:
    """The first file below `root` named one of `names` (shallowest first)."""
    if not root.is_dir():
        return None
    wanted = list(names)
    for name in wanted:
        direct = root / name
        if direct.is_file():
            return direct
    for name in wanted:
        found = sorted(root.rglob(name), key=lambda p: len(p.parts))
        if found:
            return found[0]
    return None


def _require(root: Path, name: str, dataset: str, expected: Iterable[str]) -> Path:
    path = find_file(root, [name, f"{name}.gz"])
    if path is None:
        raise MissingFilesError(
            f"dataset {dataset}: {name} not found under {root} "
            f"(expected the official files: {', '.join(expected)})"
        )
    return path


def _open(path: Path) -> BinaryIO:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally gzipped) as an array; only unsigned-byte data, as MNIST uses."""
    try:
        with _open(path) as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read IDX file ({e})") from None
    if len(raw) < 4:
        raise DataError(f"{path}: not an IDX file (too short)")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08 or not 1 <= ndim <= 4:
        raise DataError(f"{path}: not an unsigned-byte IDX file (bad magic number)")
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    count = int(np.prod(shape))
    if len(raw) - header != count:
        raise DataError(f"{path}: IDX header says {count} values, file holds {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def read_mnist_like(root: Path, dataset: str) -> Arrays:
    """MNIST or Fashion-MNIST from IDX files."""
    expected = [f"{n}[.gz]" for n in IDX_FILES.values()]
    arrays = {k: read_idx(_require(root, n, dataset, expected)) for k, n in IDX_FILES.items()}
    for part in ("train", "test"):
        images, labels = arrays[f"{part}_images"], arrays[f"{part}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(
                f"dataset {dataset}: {part} images {images.shape} and labels {labels.shape} do not match"
            )
    return (
        arrays["train_images"],
        arrays["train_labels"].astype(np.int64),
        arrays["test_images"],
        arrays["test_labels"].astype(np.int64),
    )


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: a data file must not run code."""

    _ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),  # how protocol-2 pickles from Python 3 spell bytes
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")


def _cifar_batch(raw: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        batch = _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except (pickle.UnpicklingError, KeyError, TypeError, ValueError, EOFError) as e:
        raise DataError(f"{where}: not a CIFAR-10 python batch ({e})") from None
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise DataError(f"{where}: CIFAR-10 batch has data {data.shape}, labels {labels.shape}")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, labels


def read_cifar10(root: Path) -> Arrays:
    """CIFAR-10 (python version) from extracted batches or the official archive."""
    batches: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    first = find_file(root, ["data_batch_1"])
    if first is not None:
        folder = first.parent
        for name in CIFAR10_FILES:
            path = folder / name
            if not path.is_file():
                raise DataError(f"dataset cifar10: {name} missing in {folder}")
            batches[name] = _cifar_batch(path.read_bytes(), str(path))
    else:
        archive = find_file(root, [CIFAR10_ARCHIVE])
        if archive is None:
            raise MissingFilesError(
                f"dataset cifar10: no CIFAR-10 files under {root} (expected "
                f"{CIFAR10_ARCHIVE} or the extracted {', '.join(CIFAR10_FILES)})"
            )
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar.getmembers():
                name = Path(member.name).name
                if name in CIFAR10_FILES and member.isfile():
                    f = tar.extractfile(member)
                    assert f is not None
                    batches[name] = _cifar_batch(f.read(), f"{archive}:{member.name}")
        missing = [n for n in CIFAR10_FILES if n not in batches]
        if missing:
            raise DataError(f"dataset cifar10: {archive} lacks {', '.join(missing)}")
    train = [batches[f"data_batch_{i}"] for i in range(1, 6)]
    return (
        np.concatenate([b[0] for b in train]),
        np.concatenate([b[1] for b in train]),
        *batches["test_batch"],
    )


def _svhn_part(path: Path) -> tuple[np.ndarray, np.ndarray]:
    from scipy.io import loadmat

    try:
        mat = loadmat(path)
        x, y = mat["X"], mat["y"]
    except (ValueError, KeyError, OSError, TypeError) as e:
        raise DataError(f"{path}: not an SVHN format-2 .mat file ({e})") from None
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or y.size != x.shape[3]:
        raise DataError(f"{path}: SVHN X has shape {x.shape}, y {y.shape}")
    labels = y.reshape(-1).astype(np.int64)
    if labels.min() < 1 or labels.max() > 10:
        raise DataError(f"{path}: SVHN labels must be 1..10")
    return np.ascontiguousarray(x.transpose(3, 0, 1, 2)).astype(np.uint8), labels % 10


def read_svhn(root: Path) -> Arrays:
    """SVHN format 2 (cropped 32x32 digits) from the official .mat files."""
    train = _svhn_part(_require(root, SVHN_FILES[0], "svhn", SVHN_FILES))
    test = _svhn_part(_require(root, SVHN_FILES[1], "svhn", SVHN_FILES))
    return (*train, *test)


def _stl10_part(x_path: Path, y_path: Path) -> tuple[np.ndarray, np.ndarray]:
    raw = np.fromfile(x_path, dtype=np.uint8)
    size = 3 * 96 * 96
    if raw.size % size:
        raise DataError(f"{x_path}: {raw.size} bytes is not a whole number of 3x96x96 images")
    images = raw.reshape(-1, 3, 96, 96).transpose(0, 3, 2, 1)  # column-major per image
    labels = np.fromfile(y_path, dtype=np.uint8).astype(np.int64)
    if len(labels) != len(images):
        raise DataError(f"{y_path}: {len(labels)} labels for {len(images)} images")
    if len(labels) and (labels.min() < 1 or labels.max() > 10):
        raise DataError(f"{y_path}: STL-10 labels must be 1..10")
    return np.ascontiguousarray(images), labels - 1


def read_stl10(root: Path) -> Arrays:
    """STL-10 (binary version): the labelled train and test sets."""
    paths = [_require(root, name, "stl10", STL10_FILES) for name in STL10_FILES]
    return (*_stl10_part(paths[0], paths[1]), *_stl10_part(paths[2], paths[3]))
