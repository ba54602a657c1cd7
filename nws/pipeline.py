"""The input pipelines of one net's training: an endless stream of class-balanced epochs (a new
undersampling of every class each epoch), augmented by Keras preprocessing layers when the net's
augmentation is on, and the batches of an evaluation (augmented too under fidelity `paper`, as the
released code). `nws.training` gets them per net (on TensorFlow from `TensorFlowStreams`, which
keeps them between nets); nothing here knows the training loop.
"""

from __future__ import annotations

import gc
import math
import warnings
import weakref
from collections.abc import Callable, Iterator
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
    """The tf.data pipelines of the nets a process trains on TensorFlow, one per kind (the
    training stream, each evaluation role; with or without augmentation), each built and traced
    once: a net plugs in its own batches and its augmenters' starting values. A new pipeline per
    net cost seconds of tracing and function instantiation per net (the augmenter's map most).

    The images come as uint8 batches gathered in numpy, are scaled by TensorFlow (`_to_unit`),
    augmented by the kept augmenter and prefetched, as a net's own pipeline did. Prefetching runs
    the augmenter ahead of training, so a net's augmenter is reset only once the iterator of the
    previous net has ended (its generator is gone, `_ended`); while it lives, the new net gets a
    pipeline of its own. A net sees the same images, augmented with the same RNG states, as with
    pipelines of its own."""

    def __init__(self) -> None:
        self._datasets: dict[tuple[str, bool], Any] = {}
        self._batches: dict[tuple[str, bool], Callable[[], Iterator[Any]]] = {}
        self._running: dict[tuple[str, bool], weakref.ref] = {}
        self._augmenters: dict[str, Any] = {}

    def training(self, data: NetData, batch_size: int, seed: int, augment: bool) -> tuple[Any, int]:
        """An endless stream of class-balanced epochs (augmented with seed `seed`), and the steps
        per epoch."""
        if augment and not self._ended(("train", True)):
            return TensorFlowStreams().training(data, batch_size, seed, augment)
        indices, steps = _balanced_stream(data, batch_size, seed)

        def batches() -> Iterator[tuple[np.ndarray, np.ndarray]]:
            for index in indices:
                yield data.x_train[index], data.y_train[index]

        if augment:
            self.plug_augmenter("train", seed)
        return self._plugged("train", augment, batches), steps

    def evaluation_ended(self) -> bool:
        """Whether no augmented evaluation of an earlier net still runs (one cut short by a stop
        or an error): only then may the evaluation augmenter be reset for the next net."""
        return all(
            self._ended((role, True)) for role, augment in self._datasets if augment and role != "train"
        )

    def _ended(self, kind: tuple[str, bool]) -> bool:
        """Whether no iterator of `kind`'s pipeline still runs (tf.data drops an iterator's
        generator once the iterator is destroyed, after its prefetching stopped)."""
        running = self._running.get(kind)
        if running is None or running() is None:
            return True
        gc.collect()  # an iterator held only by a reference cycle
        return running() is None

    def plug_augmenter(self, use: str, seed: int) -> None:
        """Give the augmenter of `use` (train or evaluation) the starting values of a new one
        seeded with `seed`, as a net's own augmenter would have."""
        from nws.compiled import copy_values

        fresh = build_augmenter(seed)
        kept = self._augmenters.setdefault(use, fresh)
        if kept is not fresh:
            copy_values(fresh.variables, kept.variables)

    def evaluation(self, role: str, x: np.ndarray, y: np.ndarray, batch_size: int, drop_remainder: bool,
                   augment: bool) -> Any:  # fmt: skip
        """Batches of `x` scaled to [0, 1] for the evaluation `role` (one pipeline per role, so
        that `fit`'s validation and the test evaluation do not share one); augmented by the
        evaluation augmenter (`plug_augmenter("evaluation", ...)` first) when `augment`."""
        parts = _evaluation_parts(len(y), batch_size, drop_remainder)

        def batches() -> Iterator[tuple[np.ndarray, np.ndarray]]:
            for part in parts:
                yield x[part], y[part]

        return self._plugged(role, augment, batches)

    def _plugged(self, role: str, augment: bool, batches: Callable[[], Iterator[Any]]) -> Any:
        import tensorflow as tf

        # A generator's dataset has no known length, so Keras warns at the end of every
        # evaluation that its input "ran out of data": that end is the evaluation's end.
        warnings.filterwarnings("ignore", message="Your input ran out of data", category=UserWarning)
        kind = (role, augment)
        self._batches[kind] = batches
        if kind not in self._datasets:
            spec = (tf.TensorSpec([None, *IMAGE_SHAPE], tf.uint8), tf.TensorSpec([None], tf.int64))
            ds = tf.data.Dataset.from_generator(lambda: self._started(kind), output_signature=spec)
            ds = ds.map(_to_unit)
            if augment:
                augmenter = self._augmenters["train" if role == "train" else "evaluation"]
                ds = ds.map(lambda a, b: (augmenter(a, training=True), b))
            self._datasets[kind] = ds.prefetch(2)
        return self._datasets[kind]

    def _started(self, kind: tuple[str, bool]) -> Iterator[Any]:
        """The batches of the net plugged into `kind`, for a new iterator (watched: `_ended`)."""
        batches = self._batches[kind]()
        self._running[kind] = weakref.ref(batches)
        return batches


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

    from nws.augmentation import AlwaysAugment

    inputs = keras.Input(IMAGE_SHAPE, name="image")
    return keras.Model(inputs, net(AlwaysAugment(augmenter)(inputs)), name="nws_cnn_evaluation")
