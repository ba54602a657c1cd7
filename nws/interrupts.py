"""Stopping on Ctrl-C and SIGTERM, reliably.

Python turns a signal into KeyboardInterrupt at whatever line happens to run, and a library that
swallows every exception there (Keras' layer building has bare `except:` clauses; an exception
raised in a `__del__` is only printed) loses it: a `sample` worker told to stop would go on to
its campaign's target. So the handler also records the request, and long loops ask `check()` at
their safe points (before each net, after each evaluation), which raises again until they stop.
While Keras trains, the stop is only recorded (`deferred()`), and a callback raises it between
two steps (`between_steps()`).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_requested = ""  # the name of the signal that asked this process to stop, once one has
_deferring = 0  # inside `deferred()`: a stop signal is only recorded


def install() -> Callable[[], None]:
    """Make SIGINT and SIGTERM (a scheduler's time limit, `scancel`, `kill`) stop this process
    like Ctrl-C: unfinished runs end KILLED, a parent stops its workers. A SIGINT that this
    process was started ignoring stays ignored. Returns what puts the earlier handlers back (a
    no-op off the main thread, where signals cannot be handled) and forgets the request."""
    global _requested
    _requested = ""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def interrupt(signum: int, frame: Any) -> None:
        global _requested
        _requested = signal.Signals(signum).name
        if not _deferring:
            raise KeyboardInterrupt

    previous = {number: signal.getsignal(number) for number in _STOP_SIGNALS}
    for number, handler in previous.items():
        if not (number == signal.SIGINT and handler is signal.SIG_IGN):
            signal.signal(number, interrupt)

    def restore() -> None:
        global _requested
        _requested = ""
        for number, handler in previous.items():
            if handler is not None:  # None: set outside Python, cannot be put back from here
                signal.signal(number, handler)

    return restore


def requested() -> str:
    """The signal that asked this process to stop ("" while none has)."""
    return _requested


def check() -> None:
    """Raise KeyboardInterrupt if this process was asked to stop: the one its signal raised may
    have been swallowed on the way."""
    if _requested:
        raise KeyboardInterrupt(f"{_requested} received")


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold a stop signal's KeyboardInterrupt until the block is over: for a step that must not
    be cut in two, such as creating an MLflow run and learning its id (cut after the commit, the
    run would stay RUNNING with nobody left who knows it)."""
    with held():
        yield
    if not _deferring:
        check()


@contextlib.contextmanager
def held() -> Iterator[None]:
    """Only record a stop signal during the block, for code of another library that must not be
    cut and must not see the stop either (Optuna's journal write, inside Optuna's own handling of
    a trial's end, which breaks on a KeyboardInterrupt): the next `check()` raises it."""
    global _deferring
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1


def forget_unhandled() -> None:
    """Let a process that handled its stop end with its own exit code.

    CPython marks a KeyboardInterrupt that leaves code run by `exec` of a string (a dataclass
    being made while a module is imported, when the signal lands there) as unhandled, and keeps
    the mark after the interrupt was caught: `python -m` then ends the process by SIGINT instead
    of with its exit code. The mark is cleared when the next string is run.
    """
    exec("")


def between_steps() -> Any:
    """A Keras callback that raises a held stop's KeyboardInterrupt before each epoch and each
    training or evaluation step: use it with the model's work inside `deferred()`.

    Raised by the signal handler instead, at whatever line runs, KeyboardInterrupt lands inside
    Keras and TensorFlow (function tracing, the tf.data iterator that runs a Python generator in
    TensorFlow's threads): there it was swallowed, or turned into another error (a `sample` net
    ended FAILED instead of KILLED), and a process stopped mid-net could end in a native abort.
    Raised here, it leaves Keras like any error of a callback, between two steps. The checks
    sit in the `begin` hooks: a batch-end hook would make Keras wait for each step's results.
    """
    import keras

    class StopBetweenSteps(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            check()

        def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
            check()

        def on_test_batch_begin(self, batch: int, logs: Any = None) -> None:
            check()

        def on_predict_batch_begin(self, batch: int, logs: Any = None) -> None:
            check()

    return StopBetweenSteps()
