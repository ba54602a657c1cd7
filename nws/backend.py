"""Which Keras 3 backend trains the nets and the meta-classifiers: `tensorflow` (the default) or
`jax`. Everything that differs between backends is decided here, from one `Backend` per name
(`named`, `current`); no other module compares backend names. A new backend (PyTorch, say) is a
`Backend` entry here, its branches below (`configure`, `seed`, `array_batches`), the input
pipeline it uses (`tensorflow` picks `nws.net.pipeline`'s tf.data streams or its numpy batches), and
its tests.

A process has one Keras backend, fixed when `keras` is first imported, so `select` runs before
that (entry points parse their parameters first; the worker processes of `--workers` get the
same parameter). With `jax`, training imports no TensorFlow: `seed` replaces
`keras.utils.set_random_seed`, which imports TensorFlow whenever it is installed, and the
environment tags name JAX's version and devices.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import platform
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nws import __version__
from nws.errors import ParameterError

TENSORFLOW = "tensorflow"
JAX = "jax"
BACKENDS = (TENSORFLOW, JAX)
DEFAULT_BACKEND = TENSORFLOW
TAG_BACKEND = "nws.backend"
JAX_CACHE_BYTES = 2 * 1024**3


@dataclass(frozen=True)
class Backend:
    """What differs between Keras backends."""

    name: str
    packages: tuple[str, ...]  # the distributions it is installed as (a registered model's requirements)
    tensorflow: bool  # runs on TensorFlow: tf.data input pipelines, TensorFlow's logging tamed at start
    packs: bool  # trains several nets in one compiled step (`sample --pack`, `nws.net.pack`)
    resizer: str  # the package whose resize makes dataset images (`nws.data.preprocess`)

    def environment(self, deterministic: bool, threads: int) -> None:
        """What the backend reads from the environment when it starts: set before it starts."""
        if self.tensorflow:
            tensorflow_environment(threads)  # before loading images starts TensorFlow
        else:
            jax_environment(deterministic, threads)


BY_NAME = {
    TENSORFLOW: Backend(TENSORFLOW, ("tensorflow",), tensorflow=True, packs=False, resizer="tensorflow"),
    JAX: Backend(JAX, ("jax", "jaxlib"), tensorflow=False, packs=True, resizer="jax"),
}


def named(name: str) -> Backend:
    """The backend of that name; a ParameterError naming `backend` otherwise."""
    return BY_NAME[check_backend(name)]


def current() -> Backend:
    """The backend Keras runs on in this process (imports Keras)."""
    return BY_NAME[active()]


def chosen() -> Backend:
    """The backend this process is set to run on (`KERAS_BACKEND`), without importing Keras."""
    return BY_NAME.get(os.environ.get("KERAS_BACKEND", DEFAULT_BACKEND), BY_NAME[DEFAULT_BACKEND])


def check_backend(value: str, name: str = "backend") -> str:
    """The value when it names a backend; a ParameterError naming the parameter otherwise."""
    if value not in BACKENDS:
        raise ParameterError(name, f"{value!r} is not one of {', '.join(BACKENDS)}")
    return value


def select(backend: str) -> None:
    """Make `backend` this process's Keras backend. Refused when Keras already runs another
    one here (a process cannot switch: start another process)."""
    check_backend(backend)
    if "keras" in sys.modules:
        running = sys.modules["keras"].backend.backend()
        if running != backend:
            raise ParameterError(
                "backend", f"this process already runs Keras on {running}; {backend} needs a new process"
            )
        return
    os.environ["KERAS_BACKEND"] = backend
    if backend == TENSORFLOW:
        spare_optional_jax()
    if backend == JAX:
        # Workers share a device: JAX would otherwise take 75 % of a GPU's memory at its start.
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        compilation_cache()


OPTIONAL_JAX_IMPORTERS = ("tensorflow.lite.", "keras.src.callbacks.orbax_checkpoint")
"""Modules that import JAX when they load, whatever the backend, and do without it: TensorFlow's
`tf.lite` converter (for converting JAX functions) and Keras' Orbax checkpoint callback (a patch
of old JAX versions). Neither is used by nws."""


class _NoOptionalJax(importlib.abc.MetaPathFinder):
    """Refuses `import jax` to `OPTIONAL_JAX_IMPORTERS` in a TensorFlow process: JAX's start is
    0.7 of the 4.6 CPU-s that starting Keras on TensorFlow costs on this project's machine, paid
    by every process (each worker, each `mlflow run` step). Both importers catch the ImportError;
    an import of JAX by any other module goes through."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> None:
        if name == "jax" and _importer().startswith(OPTIONAL_JAX_IMPORTERS):
            raise ImportError("jax is optional here and not imported on TensorFlow (nws.backend)")


def _importer() -> str:
    """The module whose import statement is running (the first frame outside importlib)."""
    frame = sys._getframe(2)
    while frame is not None and str(frame.f_globals.get("__name__", "")).startswith("importlib"):
        frame = frame.f_back
    return str(frame.f_globals.get("__name__", "")) if frame is not None else ""


def spare_optional_jax() -> None:
    """Once per process, before Keras starts on TensorFlow: `_NoOptionalJax`."""
    if not any(isinstance(finder, _NoOptionalJax) for finder in sys.meta_path):
        sys.meta_path.insert(0, _NoOptionalJax())


def compilation_cache() -> None:
    """JAX's persistent compilation cache, on unless the user set it: the nets of a campaign
    share a few architectures, and a net whose program was compiled before (by this process or
    another) skips XLA's compile, a few seconds per net on a CPU (`JAX_COMPILATION_CACHE_DIR`
    moves it, `NWS_JAX_CACHE=0` turns it off). A cache hit runs the same program: results do
    not change. At most `JAX_CACHE_BYTES`, least recently used entries dropped first; the size
    limit makes JAX lock the cache (filelock), so workers can share it."""
    if os.environ.get("NWS_JAX_CACHE", "1") == "0":
        return
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nws" / "jax"
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(default))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    if importlib.util.find_spec("filelock") is not None:  # JAX needs it for a size limit
        os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(JAX_CACHE_BYTES))


def active() -> str:
    """The backend Keras runs on in this process."""
    import keras

    return keras.backend.backend()


def jax_environment(deterministic: bool = True, threads: int = 0) -> None:
    """What XLA reads when JAX starts: CPU threads and GPU op determinism. Set before JAX starts;
    later it has no effect."""
    flags = os.environ.get("XLA_FLAGS", "").split()
    if threads and not any(f.startswith("--xla_cpu_multi_thread_eigen") for f in flags):
        flags += ["--xla_cpu_multi_thread_eigen=false", f"intra_op_parallelism_threads={threads}"]
    if deterministic and not any(f.startswith("--xla_gpu_deterministic_ops") for f in flags):
        flags.append("--xla_gpu_deterministic_ops=true")
    os.environ["XLA_FLAGS"] = " ".join(flags)


_tf_configured = False


def _interop_threads(threads: int) -> int:
    """Inter-op threads to go with `threads` intra-op ones: one or two."""
    return max(1, min(threads, 2))


def tensorflow_environment(threads: int = 0) -> None:
    """What TensorFlow reads from the environment when it starts: GPU memory growth (workers
    share a GPU) and CPU thread pools. Set before anything imports TensorFlow, these hold even
    when loading data starts TensorFlow before `configure_tensorflow` runs."""
    os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")
    spare_optional_jax()
    if threads:
        os.environ["TF_NUM_INTRAOP_THREADS"] = str(threads)
        os.environ["TF_NUM_INTEROP_THREADS"] = str(_interop_threads(threads))


def configure_tensorflow(deterministic: bool = True, threads: int = 0) -> None:
    """Once per process: GPU memory growth (workers share a GPU), op determinism, CPU threads."""
    global _tf_configured
    if _tf_configured:
        return
    tensorflow_environment(threads)
    import tensorflow as tf

    try:
        for gpu in tf.config.list_physical_devices("GPU"):
            tf.config.experimental.set_memory_growth(gpu, True)
        if threads:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(_interop_threads(threads))
    except RuntimeError:  # TensorFlow already started: the environment above applied instead
        pass
    if deterministic:
        tf.config.experimental.enable_op_determinism()
    _tf_configured = True


def configure(deterministic: bool = True, threads: int = 0) -> None:
    """Once per process, for the active backend: op determinism and CPU threads (TensorFlow
    also GPU memory growth; JAX reads its flags when it starts, see `jax_environment`)."""
    if active() == TENSORFLOW:
        configure_tensorflow(deterministic=deterministic, threads=threads)
    else:
        jax_environment(deterministic, threads)


def seed(value: int) -> None:
    """Seed Keras' initialisers, dropout and `keras.random` for one net. On TensorFlow this is
    `keras.utils.set_random_seed`; elsewhere the same without TensorFlow: a fresh global seed
    generator (`clear_session`), and Python's and numpy's generators, from which Keras draws the
    seeds of layers created without one."""
    import keras

    if keras.backend.backend() == TENSORFLOW:
        keras.utils.set_random_seed(value)
        return
    keras.utils.clear_session(free_memory=False)
    random.seed(value)
    np.random.seed(value)


def array_batches(arrays: Any, batch_size: int) -> Any:
    """Arrays (one, or a tuple of equally long ones) as batches for Keras' `fit` and `predict`.
    On TensorFlow a tf.data stream without a map: given arrays, Keras builds one with a parallel
    map, which op determinism makes sequential, logging an error-level "NodeDef mentions
    attribute use_unbounded_threadpool" line per call. Elsewhere a PyDataset of their slices."""
    import keras

    if keras.backend.backend() == TENSORFLOW:
        import tensorflow as tf

        return tf.data.Dataset.from_tensor_slices(arrays).batch(batch_size)
    parts = arrays if isinstance(arrays, tuple) else (arrays,)

    class ArrayBatches(keras.utils.PyDataset):
        def __len__(self) -> int:
            return -(-len(parts[0]) // batch_size)

        def __getitem__(self, index: int) -> Any:
            batch = tuple(part[index * batch_size : (index + 1) * batch_size] for part in parts)
            return batch if isinstance(arrays, tuple) else batch[0]

    return ArrayBatches()


def made_batches(
    make: Callable[[int], tuple[np.ndarray, ...]], epochs: int, per_epoch: int, workers: int = 2
) -> Any:
    """Batches for Keras' `fit(..., epochs=epochs, steps_per_epoch=per_epoch)`: one stream of
    `epochs * per_epoch` batches, batch i made on demand by `make(i)` (a tuple of arrays of fixed
    shapes) ahead of the training step, each epoch training on the next `per_epoch` batches of the
    stream, never on one trained on before.

    On TensorFlow a tf.data stream that calls `make` through `numpy_function`. A Keras PyDataset
    of all the batches is read from its start again every epoch (the DMC saw its first round's
    batches in every round) and, on TensorFlow, made every batch of the stream every epoch
    ahead of need: 1,065 ms per DMC step against 478 ms at a slice length of 512 on 2 CPU cores.
    Elsewhere a PyDataset of one epoch that moves on to the next epoch's batches at each epoch's
    end, made by `workers` threads."""
    import keras

    first = make(0)
    if keras.backend.backend() == TENSORFLOW:
        import tensorflow as tf

        def made(index: Any) -> tuple[Any, ...]:
            parts = tf.numpy_function(lambda i: make(int(i)), [index], [tf.as_dtype(a.dtype) for a in first])
            for part, example in zip(parts, first, strict=True):
                part.set_shape(example.shape)
            return tuple(parts)

        return tf.data.Dataset.range(epochs * per_epoch).map(made).prefetch(workers)

    class MadeBatches(keras.utils.PyDataset):
        def __init__(self) -> None:
            super().__init__(workers=workers, use_multiprocessing=False, max_queue_size=4 * workers)
            self.epoch = 0

        def __len__(self) -> int:
            return per_epoch

        def __getitem__(self, index: int) -> tuple[np.ndarray, ...]:
            batch = self.epoch * per_epoch + index
            return first if batch == 0 else make(batch)

        def on_epoch_end(self) -> None:
            self.epoch += 1

    return MadeBatches()


def environment_tags() -> dict[str, str]:
    """The versions and device a net was trained with (tags of its run)."""
    import keras

    backend = keras.backend.backend()
    tags = {
        "nws.version": __version__,
        TAG_BACKEND: backend,
        "nws.keras": keras.__version__,
        "nws.python": platform.python_version(),
    }
    if backend == TENSORFLOW:
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        tags["nws.tensorflow"] = tf.__version__
    else:
        import jax

        gpus = [d for d in jax.devices() if d.platform == "gpu"]
        tags["nws.jax"] = jax.__version__
    tags["nws.device"] = f"GPU x{len(gpus)}" if gpus else "CPU"
    return tags
