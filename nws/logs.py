"""A log a newcomer can read: our own lines and real warnings, without the known-harmless lines that
TensorFlow prints when it starts.

TensorFlow's native start-up lines (the absl banner "All log messages before absl::InitializeLog()
...", oneDNN's and the CUDA stub's notes, and on a machine without a GPU the error-level "failed
call to cuInit") are written to file descriptor 2 while it loads, before any setting of ours
could reach its logger: `TF_CPP_MIN_LOG_LEVEL` does not cover them. So TensorFlow is started once,
early, with descriptor 2 caught, and every caught line that is not one of those is written back.
Its Python-side retracing warning (each net is a new Keras model, so retracing is expected) is
dropped by a logging filter; every other TensorFlow warning stays.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

from nws.backend import DEFAULT_BACKEND
from nws.diskspace import is_disk_full

ENVIRONMENT = {
    "TF_CPP_MIN_LOG_LEVEL": "2",  # TensorFlow's native info and warning lines; errors stay
    "KERAS_BACKEND": DEFAULT_BACKEND,
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}
"""Read by TensorFlow, Keras and MLflow when they load: set before any of them is imported."""

HARMLESS_START_LINES = re.compile(
    r"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|^[IW]\d{4} .*\] (oneDNN custom operations are on|Could not find cuda drivers)"
    r"|^E\d{4} .*\] failed call to cuInit"
    r"|^This TensorFlow binary is optimized to use available CPU instructions"
    r"|^To enable the following instructions: .* rebuild TensorFlow"
)
"""What TensorFlow prints while it starts on a CPU-only machine, none of it a fault of the run."""

RETRACING = "triggered tf.function retracing"


def quiet_environment() -> None:
    """The environment of `ENVIRONMENT`, where the user has not set it; MLflow's tracebacks of a
    full disk dropped (`_DropDiskFull`)."""
    for name, value in ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    for name in DISK_FULL_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropDiskFull) for f in logger.filters):
            logger.addFilter(_DropDiskFull())


class _DropRetracing(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return RETRACING not in record.getMessage()


class _DropDiskFull(logging.Filter):
    """MLflow logs a database error with its traceback before it raises it (one per failed
    write: hundreds of lines when the database's disk fills). A full disk is told in one line
    by the CLI instead, with the traceback in a file (`nws.diskspace`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return error is None or not is_disk_full(error)


DISK_FULL_LOGGERS = (
    "mlflow.store.db.utils",
    "mlflow.store.tracking.sqlalchemy_store",
    "optuna.study._optimize",
)
"""Loggers that print a full disk's traceback before the error reaches the CLI."""


@contextlib.contextmanager
def _native_stderr_filtered() -> Iterator[None]:
    """Descriptor 2 goes to a file while the block runs; its lines, less the harmless start-up
    ones, are written back to stderr afterwards."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            kept = [
                line
                for line in caught.read().decode(errors="replace").splitlines(keepends=True)
                if not HARMLESS_START_LINES.search(line)
            ]
            sys.stderr.write("".join(kept))
            sys.stderr.flush()


def start_tensorflow() -> Any:
    """Import TensorFlow and let it find its devices (where cuInit is tried) with its start-up
    lines filtered; the module. Later imports of TensorFlow or Keras reuse this one quietly."""
    quiet_environment()
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    with _native_stderr_filtered():
        import tensorflow as tf

        tf.config.list_physical_devices()
    logging.getLogger("tensorflow").addFilter(_DropRetracing())
    return tf
