"""Writers of small files in the official formats of the paper datasets, for reader tests.

Each follows the format's own documentation: IDX (MNIST, Fashion-MNIST), the pickled python batches
of CIFAR-10, SVHN format 2 (MATLAB .mat with X [32,32,3,N], y [N,1], label 10 for digit 0), and
the STL-10 binary files (column-major 3x96x96 images, labels 1..10).
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np


def random_images(n: int, shape: tuple[int, ...], seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
    labels = np.arange(n) % 10
    return images, labels


def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> Path:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path = Path(f"{path}.gz") if gz else Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def write_mnist_like(root: Path, train, test, gz: bool = True) -> None:
    for prefix, (images, labels) in (("train", train), ("t10k", test)):
        write_idx(root / f"{prefix}-images-idx3-ubyte", images, gz)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", labels.astype(np.uint8), gz)


def cifar_batch_bytes(images: np.ndarray, labels: np.ndarray) -> bytes:
    data = images.transpose(0, 3, 1, 2).reshape(len(images), 3072)  # R, G, B planes
    batch = {b"batch_label": b"test", b"labels": [int(x) for x in labels], b"data": data,
             b"filenames": [b"x.png"] * len(labels)}  # fmt: skip
    return pickle.dumps(batch, protocol=2)


def write_cifar10(root: Path, train, test, archive: bool = False) -> None:
    """Five training batches (the training images split evenly) and one test batch."""
    files = {}
    for i, part in enumerate(np.array_split(np.arange(len(train[1])), 5), start=1):
        files[f"data_batch_{i}"] = cifar_batch_bytes(train[0][part], train[1][part])
    files["test_batch"] = cifar_batch_bytes(*test)
    root.mkdir(parents=True, exist_ok=True)
    if archive:
        with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as tar:
            for name, data in files.items():
                info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    else:
        folder = root / "cifar-10-batches-py"
        folder.mkdir(exist_ok=True)
        for name, data in files.items():
            (folder / name).write_bytes(data)


def write_svhn(root: Path, train, test) -> None:
    from scipy.io import savemat

    root.mkdir(parents=True, exist_ok=True)
    for name, (images, labels) in (("train_32x32.mat", train), ("test_32x32.mat", test)):
        y = np.where(labels == 0, 10, labels).astype(np.uint8).reshape(-1, 1)
        savemat(root / name, {"X": images.transpose(1, 2, 3, 0), "y": y})


def write_stl10(root: Path, train, test) -> None:
    folder = root / "stl10_binary"
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, (images, labels) in (("train", train), ("test", test)):
        # Column-major per image: stored as [N, 3, 96(x), 96(y)].
        images.transpose(0, 3, 2, 1).astype(np.uint8).tofile(folder / f"{prefix}_X.bin")
        (labels + 1).astype(np.uint8).tofile(folder / f"{prefix}_y.bin")
