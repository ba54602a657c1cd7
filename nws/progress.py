"""Progress over nets and epochs: tqdm bars on a terminal, plain lines otherwise (logs, CI)."""

from __future__ import annotations

import sys
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
        """An observer for `nws.training.train_net`."""
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


def say(text: str) -> None:
    """A line of an entry point's report on stdout, shown at once (progress goes to stderr)."""
    print(text, file=sys.stdout, flush=True)
