"""The input pipelines of one net's training: an endless stream of class-balanced epochs (a new
undersampling of every class each epoch), augmented by Keras preprocessing layers when the net's
augmentation is on, and the batches of an evaluation (augmented too under fidelity `paper`, as the
released code). `nws.net.training` gets them per net (on TensorFlow from `TensorFlowStreams`, which
keeps them between nets); nothing here knows the training loop.
"""

from __future__ import annotations

import gc
import math
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from nws.data.preprocess import BalancedSampler, NetData
from nws.net.cnn import IMAGE_SHAPE


def build_augmenter(seed: int) -> Any:
    """The original's augmentation (one switch for geometry and colour) from Keras layers."""
    import keras
    from keras import layers

    from nws.net.augmentation import ROTATION, SHEAR, SHIFT_PIXELS, ZOOM, colour_layers

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


def _balanced_stream(data: NetData, batch_size: int, seed: int) -> tuple[Iterator[np.ndarray], int]:
    """The row indices of an endless stream of class-balanced epochs, and the steps per epoch (a
    training set smaller than one batch trains in batches of its balanced epoch)."""
    sampler = BalancedSampler(data.y_train, seed)
    batch_size = min(batch_size, sampler.epoch_size)
    steps = sampler.epoch_size // batch_size
    return _index_batches(sampler, batch_size, steps), steps


def _evaluation_parts(n_images: int, batch_size: int, drop_remainder: bool) -> list[slice]:
    """The batches of an evaluation of `n_images`, in order (the remainder dropped or not)."""
    count = n_images // batch_size if drop_remainder else -(-n_images // batch_size)
    return [slice(i * batch_size, (i + 1) * batch_size) for i in range(count)]


class TensorFlowStreams:
    """The tf.data pipelines of the nets a process trains on TensorFlow. The training stream is
    kept, one per kind (with or without augmentation), built and traced once: each net plugs in
    its own batches and its augmenter's starting values (a new stream per net cost seconds of
    tracing per net, its augmenter's map most). Evaluations get pipelines of their own, without
    Python in their loop: fed by a generator beside the training stream's, they ran several times
    slower and now and then stalled.

    The training images come as uint8 batches gathered in numpy, are scaled by TensorFlow
    (`_to_unit`), augmented by the kept augmenter and prefetched, as a net's own stream did.
    Prefetching runs the augmenter ahead of training, so it is reset for a new net only once the
    iterator of the previous net has ended (its generator is gone, `_ended`); while that one
    lives, the new net gets a stream of its own. A net sees the same images, augmented with the
    same RNG states, as with pipelines of its own."""

    def __init__(self) -> None:
        self._streams: dict[bool, Any] = {}
        self._batches: dict[bool, Callable[[], Iterator[Any]]] = {}
        self._running: dict[bool, weakref.ref] = {}
        self._augmenter: Any = None

    def training(self, data: NetData, batch_size: int, seed: int, augment: bool) -> tuple[Any, int]:
        """An endless stream of class-balanced epochs (augmented with seed `seed`), and the steps
        per epoch."""
        if augment and not self._ended(augment):
            return TensorFlowStreams().training(data, batch_size, seed, augment)
        indices, steps = _balanced_stream(data, batch_size, seed)

        def batches() -> Iterator[tuple[np.ndarray, np.ndarray]]:
            for index in indices:
                yield data.x_train[index], data.y_train[index]

        self._batches[augment] = batches
        if augment:
            self._plug_augmenter(seed)
        if augment not in self._streams:
            self._streams[augment] = self._stream(augment)
        return self._streams[augment], steps

    def _plug_augmenter(self, seed: int) -> None:
        """Give the kept augmenter the starting values of a new one seeded with `seed`."""
        from nws.net.compiled import copy_values

        fresh = build_augmenter(seed)
        if self._augmenter is None:
            self._augmenter = fresh
        else:
            copy_values(fresh.variables, self._augmenter.variables)

    def _stream(self, augment: bool) -> Any:
        import tensorflow as tf

        spec = (tf.TensorSpec([None, *IMAGE_SHAPE], tf.uint8), tf.TensorSpec([None], tf.int64))
        ds = tf.data.Dataset.from_generator(lambda: self._started(augment), output_signature=spec)
        ds = ds.map(_to_unit)
        if augment:
            augmenter = self._augmenter
            ds = ds.map(lambda a, b: (augmenter(a, training=True), b))
        return ds.prefetch(2)

    def _started(self, augment: bool) -> Iterator[Any]:
        """The batches of the net plugged in, for a new iterator (watched: `_ended`)."""
        batches = self._batches[augment]()
        self._running[augment] = weakref.ref(batches)
        return batches

    def _ended(self, augment: bool) -> bool:
        """Whether no iterator of the stream still runs (tf.data drops an iterator's generator
        once the iterator is destroyed, after its prefetching stopped)."""
        running = self._running.get(augment)
        if running is None or running() is None:
            return True
        gc.collect()  # an iterator held only by a reference cycle
        return running() is None


def evaluation_dataset(
    x: np.ndarray, y: np.ndarray, batch_size: int, drop_remainder: bool = False, augmenter: Any = None
) -> Any:
    """Batches of images scaled to [0, 1]; with an `augmenter`, augmented as in training. A
    pipeline of the net's own, without Python in its loop (see `TensorFlowStreams`)."""
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size, drop_remainder=drop_remainder)
    ds = ds.map(_to_unit)
    if augmenter is not None:
        ds = ds.map(lambda a, b: (augmenter(a, training=True), b))
    return ds.prefetch(2)


def _to_unit(images: Any, labels: Any) -> tuple[Any, Any]:
    """uint8 images as float32 in [0, 1], divided as TensorFlow divides."""
    import tensorflow as tf

    return tf.cast(images, tf.float32) / 255.0, labels


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
    the steps per epoch: `TensorFlowStreams.training`'s stream, the scaling done in numpy."""
    indices, steps = _balanced_stream(data, batch_size, seed)

    def batches() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for index in indices:
            yield scaled(data.x_train[index]), data.y_train[index]

    return batches(), steps


def scaled(images: np.ndarray) -> np.ndarray:
    """uint8 images as float32 in [0, 1]."""
    return np.multiply(images, np.float32(1 / 255), dtype=np.float32)


def evaluation_batches(x: np.ndarray, y: np.ndarray, batch_size: int, drop_remainder: bool = False) -> Any:
    """`TensorFlowStreams.evaluation`'s batches as a Keras PyDataset: uint8 images scaled per
    batch, so no float32 copy of a whole test set is held. Augmentation, where wanted, is in the
    model evaluated (`evaluation_model`)."""
    import keras

    parts = _evaluation_parts(len(y), batch_size, drop_remainder)

    class EvaluationBatches(keras.utils.PyDataset):
        def __len__(self) -> int:
            return len(parts)

        def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
            return scaled(x[parts[i]]), y[parts[i]]

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

    from nws.net.augmentation import AlwaysAugment

    inputs = keras.Input(IMAGE_SHAPE, name="image")
    return keras.Model(inputs, net(AlwaysAugment(augmenter)(inputs)), name="nws_cnn_evaluation")
