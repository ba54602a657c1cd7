"""Progress: tqdm bars on a terminal; off a terminal (a log file, `nohup`, a cluster job, CI) plain
lines. `Progress` reports a campaign's nets and epochs (a line per epoch: an epoch is seconds to
minutes); `Steps` reports one task counted in steps (zoo building, a meta-model's epochs, its
evaluation) with, off a terminal, one compact line at most every `NWS_PROGRESS_SECONDS` (default
5) and one at the end."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any, TextIO


class Progress:
    """Reports a campaign's nets (outer) and each net's epochs (inner)."""

    def __init__(self, total_nets: int, stream: TextIO | None = None, bars: bool | None = None):
        self.stream = stream or sys.stderr
        self.total = total_nets
        self.bars = self.stream.isatty() if bars is None else bars
        self._nets: Any = None
        self._epochs: Any = None
        self._index = 0
        self._max_epochs = 0
        if self.bars:
            from tqdm import tqdm

            self._nets = tqdm(total=total_nets, desc="nets", unit="net", file=self.stream)

    def start_net(self, index: int, label: str, max_epochs: int) -> None:
        self._index, self._max_epochs = index, max_epochs
        if self.bars:
            from tqdm import tqdm

            self._epochs = tqdm(total=max_epochs, desc=label, unit="epoch", leave=False, file=self.stream)
        else:
            self._line(f"net {index}/{self.total}: {label}")

    def epoch(self, _model: Any, epoch: int, metrics: Mapping[str, float]) -> None:
        """An observer for `nws.net.training.train_net`."""
        summary = (
            f"train {metrics['train_accuracy']:.3f} valid {metrics['valid_accuracy']:.3f} "
            f"test {metrics['test_accuracy']:.3f}"
        )
        if self.bars:
            if epoch > 0:
                self._epochs.update(1)
            self._epochs.set_postfix_str(summary)
        else:
            self._line(f"net {self._index}/{self.total} epoch {epoch}/{self._max_epochs}: {summary}")

    def end_net(self, message: str) -> None:
        if self.bars:
            if self._epochs is not None:
                self._epochs.close()
            self._nets.update(1)
            self._nets.write(message, file=self.stream)
        else:
            self._line(message)

    def close(self) -> None:
        if self.bars and self._nets is not None:
            self._nets.close()

    def _line(self, text: str) -> None:
        print(text, file=self.stream, flush=True)


PROGRESS_SECONDS = 5.0
"""Off a terminal, the least time between two progress lines of a task (`NWS_PROGRESS_SECONDS`)."""


def _interval() -> float:
    try:
        return max(0.0, float(os.environ.get("NWS_PROGRESS_SECONDS", PROGRESS_SECONDS)))
    except ValueError:
        return PROGRESS_SECONDS


class Steps:
    """One task counted in steps: a tqdm bar on a terminal, else `label: done/total unit` lines,
    at most one per interval and one when it closes (with its time)."""

    def __init__(
        self, label: str, total: int, unit: str, stream: TextIO | None = None, bars: bool | None = None
    ):
        self.stream = stream or sys.stderr
        self.label, self.total, self.unit = label, total, unit
        self.bars = self.stream.isatty() if bars is None else bars
        self.done = 0
        self.note = ""
        self._start = self._last = time.monotonic()
        self._interval = _interval()
        self._bar: Any = None
        self._lock = threading.Lock()
        if self.bars:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=label, unit=unit, leave=False, file=self.stream)

    def advance(self, steps: int = 1, note: str = "") -> None:
        with self._lock:  # zoo building advances from several threads
            self.done += steps
            self.note = note or self.note
            self._report(steps, note)

    def _report(self, steps: int, note: str) -> None:
        if self.bars:
            self._bar.update(steps)
            if note:
                self._bar.set_postfix_str(note)
            return
        now = time.monotonic()
        if now - self._last >= self._interval and self.done < self.total:
            self._last = now
            self._line()

    def close(self) -> None:
        if self.bars:
            self._bar.close()
        else:
            self._line(f" in {time.monotonic() - self._start:.1f} s")

    def __enter__(self) -> Steps:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    def _line(self, suffix: str = "") -> None:
        note = f" ({self.note})" if self.note else ""
        print(
            f"{self.label}: {self.done}/{self.total} {self.unit}{note}{suffix}", file=self.stream, flush=True
        )

    def keras_callback(self) -> Any:
        """A Keras callback that advances one step per epoch, noting the latest loss."""
        import keras

        steps = self

        class EpochSteps(keras.callbacks.Callback):
            def on_epoch_end(self, epoch: int, logs: Mapping[str, float] | None = None) -> None:
                loss = (logs or {}).get("loss")
                steps.advance(1, f"loss {loss:.4f}" if loss is not None else "")

        return EpochSteps()


def say(text: str) -> None:
    """A line of an entry point's report on stdout, shown at once (progress goes to stderr)."""
    print(text, file=sys.stdout, flush=True)
