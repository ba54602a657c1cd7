"""Preprocessing (reference section 3): every image to 32x32x3, the 90/10 train/validation split of
the official training set, and per-epoch class balancing.

Images are kept as uint8 (a quarter of float32's memory); the training pipeline scales them to
[0, 1] per batch. Grey images are resized bilinearly and repeated to three channels; larger images
(STL-10) are downsampled with antialiasing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nws.backend import chosen
from nws.errors import DataError
from nws.net.fidelity import DEFAULT_FIDELITY, PAPER, check_fidelity

SIDE = 32
VALID_FRACTION = 0.1
TF_MNIST_VALIDATION = 5000
"""The released code read MNIST and Fashion-MNIST with TF1's `input_data.read_data_sets`, whose
`validation_size=5000` takes the first 5,000 official training images (file order) as a
validation set that the code never used: under fidelity `paper` they are left out."""
TF_MNIST_DATASETS = ("mnist", "fashion")
_RESIZE_CHUNK = 8192


@dataclass(frozen=True)
class ImageSet:
    """A dataset's official train and test sets, preprocessed."""

    name: str
    x_train: np.ndarray  # uint8 [N, 32, 32, 3]
    y_train: np.ndarray  # int64 [N]
    x_test: np.ndarray
    y_test: np.ndarray


@dataclass(frozen=True)
class NetData:
    """What one net trains and is evaluated on."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_valid: np.ndarray
    y_valid: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    pool: ImageSet | None = None
    """The dataset the training images were taken from (shared by every net of that dataset):
    packed nets keep one copy of it on the device, not one per net."""
    train_rows: np.ndarray | None = None
    """Rows of `pool.x_train` that make `x_train`, in order."""

    def sizes(self) -> dict[str, int]:
        return {
            "n_train": len(self.y_train),
            "n_valid": len(self.y_valid),
            "n_test": len(self.y_test),
        }


def to_rgb32(images: np.ndarray) -> np.ndarray:
    """uint8 [N, 32, 32, 3] from uint8 [N, H, W] or [N, H, W, C] with C in {1, 3}."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"expected [N, H, W] or [N, H, W, 1|3] images, got {images.shape}")
    if images.shape[1:3] != (SIDE, SIDE):
        images = _resize(images)
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    return np.ascontiguousarray(images, dtype=np.uint8)


def _resize(images: np.ndarray) -> np.ndarray:
    """Bilinear, antialiased when downsampling: TensorFlow's resize, or on the JAX backend
    (which imports no TensorFlow) JAX's, on the CPU. They give the same images when upsampling;
    downsampling STL-10 differs by one level in 0.014 % of its pixels."""
    downsampling = images.shape[1] > SIDE or images.shape[2] > SIDE
    out = np.empty((len(images), SIDE, SIDE, images.shape[-1]), dtype=np.uint8)
    resize = _tensorflow_resize if chosen().tensorflow else _jax_resize
    for start in range(0, len(images), _RESIZE_CHUNK):
        chunk = resize(images[start : start + _RESIZE_CHUNK].astype(np.float32), downsampling)
        out[start : start + _RESIZE_CHUNK] = np.clip(np.round(chunk), 0, 255)
    return out


def _tensorflow_resize(images: np.ndarray, antialias: bool) -> np.ndarray:
    import tensorflow as tf

    return tf.image.resize(images, (SIDE, SIDE), method="bilinear", antialias=antialias).numpy()


def _jax_resize(images: np.ndarray, antialias: bool) -> np.ndarray:
    import jax

    with jax.default_device(jax.devices("cpu")[0]):
        shape = (len(images), SIDE, SIDE, images.shape[-1])
        return np.asarray(jax.image.resize(images, shape, method="linear", antialias=antialias))


def training_pool(images: ImageSet, fidelity: str = DEFAULT_FIDELITY) -> np.ndarray:
    """Indices of the official training images a net's train/validation split draws from: all of
    them, except under fidelity `paper` for MNIST and Fashion-MNIST, whose first 5,000 (file
    order) the released code never saw (55,000 left: 49,500 train / 5,500 validation)."""
    n = len(images.y_train)
    if check_fidelity(fidelity) != PAPER or images.name not in TF_MNIST_DATASETS:
        return np.arange(n)
    if n <= TF_MNIST_VALIDATION:
        raise DataError(
            f"dataset {images.name}: {n} training images; fidelity paper leaves out the first "
            f"{TF_MNIST_VALIDATION} (the released code's unused validation set) and needs more"
        )
    return np.arange(TF_MNIST_VALIDATION, n)


def split_for_net(
    images: ImageSet,
    seed: int,
    max_train_images: int = 0,
    max_eval_images: int = 0,
    fidelity: str = DEFAULT_FIDELITY,
) -> NetData:
    """Shuffle the official training set (its `training_pool`) with the net's seed and split it
    90/10.

    `max_train_images` caps the training part and `max_eval_images` the validation and test sets
    (0 = no cap), for quick runs.
    """
    rng = np.random.default_rng(seed)
    pool = training_pool(images, fidelity)
    order = pool[rng.permutation(len(pool))]
    cut = int((1.0 - VALID_FRACTION) * len(order))
    train, valid = order[:cut], order[cut:]
    test = np.arange(len(images.y_test))
    if max_train_images:
        train = train[:max_train_images]
    if max_eval_images:
        valid = valid[:max_eval_images]
        test = np.sort(rng.permutation(test)[:max_eval_images])
    return NetData(
        images.x_train[train],
        images.y_train[train],
        images.x_train[valid],
        images.y_train[valid],
        images.x_test[test],
        images.y_test[test],
        pool=images,
        train_rows=train,
    )


class BalancedSampler:
    """Each epoch, every class present is undersampled to the size of the smallest class,
    drawn anew; the epoch is then shuffled."""

    def __init__(self, labels: np.ndarray, seed: int) -> None:
        self._rng = np.random.default_rng(seed)
        classes = np.unique(labels)
        self._members = [np.flatnonzero(labels == c) for c in classes]
        self.per_class = min(len(m) for m in self._members)
        self.epoch_size = self.per_class * len(self._members)

    def epoch(self) -> np.ndarray:
        picks = [self._rng.choice(m, self.per_class, replace=False) for m in self._members]
        return self._rng.permutation(np.concatenate(picks))
