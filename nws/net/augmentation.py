"""The original's augmentation with the geometry in one affine transform (any Keras backend).

`nws.net.pipeline.build_augmenter` chains four Keras geometric layers (translation, rotation, zoom,
shear); on XLA's CPU backend chained gather-based transforms cost 132 ms per batch of 64 against
26 ms for one. `RandomAffine` draws the same four parameters per image, composes them into one
matrix and resamples once (one bilinear interpolation instead of four, so slightly less blur);
the colour layers and the noise follow as in `build_augmenter`. It is the augmentation of nets
trained on the JAX backend; the TensorFlow backend keeps the chained layers of its tf.data
pipeline, so its nets are unchanged.
"""

from __future__ import annotations

import math
from typing import Any

import keras
from keras import ops

from nws.net.cnn import IMAGE_SHAPE

SHIFT_PIXELS = 3.0
ROTATION = math.radians(15.0)  # RandomRotation(15 / 360): +-15 degrees
ZOOM = 0.1
SHEAR = math.tan(math.radians(3.0))


class NoiseAndClip(keras.layers.Layer):
    """Gaussian noise with a standard deviation drawn per image in [0, max], then clip."""

    def __init__(self, max_stddev: float, seed: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_stddev = max_stddev
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, images: Any, training: bool = True) -> Any:
        if training:
            std = keras.random.uniform(
                (ops.shape(images)[0], 1, 1, 1), 0.0, self.max_stddev, seed=self.seed_generator
            )
            images = images + std * keras.random.normal(ops.shape(images), seed=self.seed_generator)
        return ops.clip(images, 0.0, 1.0)

    def compute_output_shape(self, input_shape: Any) -> Any:
        """Images in, images of the same shape out: Keras then skips tracing `call` to learn
        the shape (1.5 s per packed net's build on a CPU)."""
        return input_shape


class RandomAffine(keras.layers.Layer):
    """Per image: a shift of up to +-`shift` pixels, a rotation of up to +-`angle` radians, a
    zoom of 1 +- `zoom` and a shear of [0, `shear`] along each axis, composed about the image
    centre and applied in one bilinear resampling, zeros outside."""

    def __init__(self, shift: float, angle: float, zoom: float, shear: float, seed: int, **kwargs: Any):
        super().__init__(**kwargs)
        self.shift, self.angle, self.zoom, self.shear = shift, angle, zoom, shear
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, images: Any, training: bool = True) -> Any:
        if not training:
            return images
        n, side_y, side_x = ops.shape(images)[0], ops.shape(images)[1], ops.shape(images)[2]
        u = keras.random.uniform((n, 6), seed=self.seed_generator)
        tx, ty = (2 * u[:, 0] - 1) * self.shift, (2 * u[:, 1] - 1) * self.shift
        angle = (2 * u[:, 2] - 1) * self.angle
        zoom = 1 + (2 * u[:, 3] - 1) * self.zoom
        sx, sy = u[:, 4] * self.shear, u[:, 5] * self.shear
        c, s = ops.cos(angle), ops.sin(angle)
        # Output pixel -> input pixel, about the centre: rotation @ zoom @ shear, then the shift.
        a00, a01 = zoom * (c - s * sy), zoom * (c * sx - s)
        a10, a11 = zoom * (s + c * sy), zoom * (s * sx + c)
        cx, cy = (ops.cast(side_x, "float32") - 1) / 2, (ops.cast(side_y, "float32") - 1) / 2
        b0 = cx - a00 * cx - a01 * cy + tx
        b1 = cy - a10 * cx - a11 * cy + ty
        zeros = ops.zeros_like(a00)
        transform = ops.stack([a00, a01, b0, a10, a11, b1, zeros, zeros], axis=1)
        return ops.image.affine_transform(
            images, transform, interpolation="bilinear", fill_mode="constant", fill_value=0.0
        )

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape  # as NoiseAndClip's


def colour_layers(seed: int) -> list[Any]:
    """The colour half of the original's augmentation, after the geometry in both augmenters
    (seeds `seed + 4` .. `seed + 8`; the geometric layers take `seed` .. `seed + 3`)."""
    from keras import layers

    return [
        layers.RandomBrightness(0.2, value_range=(0.0, 1.0), seed=seed + 4),
        layers.RandomContrast(0.5, value_range=(0.0, 1.0), seed=seed + 5),
        layers.RandomHue((0.0, 0.16), value_range=(0.0, 1.0), seed=seed + 6),
        # Saturation factor f multiplies saturation by f / (1 - f): 0.2308..0.6 -> 0.3..1.5.
        layers.RandomSaturation((0.3 / 1.3, 0.6), value_range=(0.0, 1.0), seed=seed + 7),
        NoiseAndClip(max_stddev=0.03, seed=seed + 8),
    ]


def build_affine_augmenter(seed: int) -> Any:
    """`build_augmenter`'s augmentation with its geometric layers as one `RandomAffine`."""
    assert IMAGE_SHAPE[0] == IMAGE_SHAPE[1]  # the shift is in pixels of a square image
    return keras.Sequential(
        [RandomAffine(SHIFT_PIXELS, ROTATION, ZOOM, SHEAR, seed=seed), *colour_layers(seed)],
        name="augmentation",
    )


class AlwaysAugment(keras.layers.Layer):
    """An augmenter applied whatever the model's training flag: evaluation under fidelity
    `paper` runs on augmented images (a functional model passes `evaluate`'s training=False to
    every layer whose `call` takes the flag; this one's does not)."""

    def __init__(self, augmenter: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.augmenter = augmenter

    def build(self, input_shape: Any) -> None:
        self.augmenter.build(input_shape)  # not by tracing `call`

    def call(self, images: Any) -> Any:
        return self.augmenter(images, training=True)

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape  # as NoiseAndClip's
