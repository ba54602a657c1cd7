"""The input pipelines of one net's training: an endless stream of class-balanced epochs (a new
undersampling of every class each epoch), augmented by Keras preprocessing layers when the net's
augmentation is on, and the batches of an evaluation (augmented too under fidelity `paper`, as the
released code). `nws.training` builds them per net; nothing here knows the training loop.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np

from nws.cnn import IMAGE_SHAPE
from nws.data.preprocess import BalancedSampler, NetData


def build_augmenter(seed: int) -> Any:
    """The original's augmentation (one switch for geometry and colour) from Keras layers."""
    import keras
    from keras import layers

    from nws.augmentation import ROTATION, SHEAR, SHIFT_PIXELS, ZOOM, colour_layers

    shift = SHIFT_PIXELS / IMAGE_SHAPE[0]
    geometry = {"fill_mode": "constant", "fill_value": 0.0}
    return keras.Sequential(
        [
            layers.RandomTranslation(shift, shift, seed=seed, **geometry),
            layers.RandomRotation(ROTATION / (2 * math.pi), seed=seed + 1, **geometry),
            layers.RandomZoom((-ZOOM, ZOOM), seed=seed + 2, **geometry),
            layers.RandomShear(x_factor=(0.0, SHEAR), y_factor=(0.0, SHEAR), seed=seed + 3, **geometry),
            *colour_layers(seed),
        ],
        name="augmentation",
    )


def _index_batches(sampler: BalancedSampler, batch_size: int, steps: int) -> Iterator[np.ndarray]:
    while True:
        order = sampler.epoch()
        for step in range(steps):
            yield order[step * batch_size : (step + 1) * batch_size]


def training_dataset(data: NetData, batch_size: int, seed: int, augment: bool) -> tuple[Any, int]:
    """An endless tf.data stream of class-balanced epochs, and the steps per epoch."""
    import tensorflow as tf

    sampler = BalancedSampler(data.y_train, seed)
    batch_size = min(batch_size, sampler.epoch_size)
    steps = sampler.epoch_size // batch_size
    images = tf.constant(data.x_train)
    labels = tf.constant(data.y_train)
    ds = tf.data.Dataset.from_generator(
        lambda: _index_batches(sampler, batch_size, steps),
        output_signature=tf.TensorSpec([None], tf.int64),
    )
    ds = ds.map(lambda idx: (tf.cast(tf.gather(images, idx), tf.float32) / 255.0, tf.gather(labels, idx)))
    if augment:
        augmenter = build_augmenter(seed)
        ds = ds.map(lambda x, y: (augmenter(x, training=True), y))
    return ds.prefetch(2), steps


def evaluation_dataset(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    drop_remainder: bool = False,
    augmenter: Any = None,
) -> Any:
    """Batches of images scaled to [0, 1]; with an `augmenter`, augmented as in training."""
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size, drop_remainder=drop_remainder)
    ds = ds.map(lambda a, b: (tf.cast(a, tf.float32) / 255.0, b))
    if augmenter is not None:
        ds = ds.map(lambda a, b: (augmenter(a, training=True), b))
    return ds.prefetch(2)


def paper_evaluation_batch(n_images: int, batch_size: int) -> int:
    """The batch size of a fidelity-`paper` evaluation of `n_images`: the net's own, with the
    remainder dropped, as the released code's fixed-size placeholders. A set smaller than one
    batch, which the released code could not evaluate (it divides by zero batches), becomes one
    batch of all its images, so that quick runs with small image caps still work."""
    return max(1, min(batch_size, n_images))


def evaluation_augmenter_seed(seed: int) -> int:
    """The seed of a net's evaluation augmentation: a stream of its own, apart from its training
    augmentation (`seed`) and from every other net's (net seeds are consecutive integers)."""
    return int(np.random.SeedSequence([seed, 1]).generate_state(1)[0] >> 2)


# Without tf.data (any backend; used on JAX): numpy batches for `fit`, a PyDataset to evaluate,
# and the augmentation inside the model that is trained or evaluated.


def balanced_batches(data: NetData, batch_size: int, seed: int) -> tuple[Iterator[Any], int]:
    """An endless stream of (float32 images in [0, 1], labels) over class-balanced epochs, and
    the steps per epoch: `training_dataset`'s stream, the gather done in numpy."""
    sampler = BalancedSampler(data.y_train, seed)
    batch_size = min(batch_size, sampler.epoch_size)
    steps = sampler.epoch_size // batch_size

    def batches() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for index in _index_batches(sampler, batch_size, steps):
            yield scaled(data.x_train[index]), data.y_train[index]

    return batches(), steps


def scaled(images: np.ndarray) -> np.ndarray:
    """uint8 images as float32 in [0, 1]."""
    return np.multiply(images, np.float32(1 / 255), dtype=np.float32)


def evaluation_batches(x: np.ndarray, y: np.ndarray, batch_size: int, drop_remainder: bool = False) -> Any:
    """`evaluation_dataset`'s batches as a Keras PyDataset: uint8 images scaled per batch, so no
    float32 copy of a whole test set is held. Augmentation, where wanted, is in the model
    evaluated (`evaluation_model`)."""
    import keras

    count = len(y) // batch_size if drop_remainder else -(-len(y) // batch_size)

    class EvaluationBatches(keras.utils.PyDataset):
        def __len__(self) -> int:
            return count

        def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
            part = slice(i * batch_size, (i + 1) * batch_size)
            return scaled(x[part]), y[part]

    return EvaluationBatches(workers=1, use_multiprocessing=False)


def training_model(net: Any, augmenter: Any) -> Any:
    """The model that `fit` trains when augmentation is on: the augmenter (active in training
    only), then the net, whose variables it shares; snapshots and evaluation use the net."""
    import keras

    inputs = keras.Input(IMAGE_SHAPE, name="image")
    return keras.Model(inputs, net(augmenter(inputs)), name="nws_cnn_training")


def evaluation_model(net: Any, augmenter: Any) -> Any:
    """The model evaluated under fidelity `paper` with augmentation on: the net on images
    augmented by its own evaluation augmenter, as the released code evaluated."""
    import keras

    from nws.augmentation import AlwaysAugment

    inputs = keras.Input(IMAGE_SHAPE, name="image")
    return keras.Model(inputs, net(AlwaysAugment(augmenter)(inputs)), name="nws_cnn_evaluation")
