"""A stop signal whose KeyboardInterrupt a library swallowed still stops the process."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Mapping

import pytest

from nws import interrupts


@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_swallowed_on_the_way_is_raised_again_at_the_next_check(number):
    before = signal.getsignal(number)
    restore = interrupts.install()
    try:
        interrupts.check()  # nothing asked yet
        swallowed = False
        try:
            os.kill(os.getpid(), number)
            time.sleep(5)  # the handler raises in here
        except BaseException:  # what a bare `except:` in a library does with it
            swallowed = True
        assert swallowed and interrupts.requested() == signal.Signals(number).name
        for _ in range(2):  # again at every check, until the process stops
            with pytest.raises(KeyboardInterrupt, match=f"{signal.Signals(number).name} received"):
                interrupts.check()
    finally:
        restore()
    assert signal.getsignal(number) is before
    assert interrupts.requested() == ""
    interrupts.check()


def test_a_stop_signal_while_deferred_is_raised_when_the_block_ends():
    restore = interrupts.install()
    try:
        reached_the_end = False
        with pytest.raises(KeyboardInterrupt, match="SIGTERM received"), interrupts.deferred():
            with interrupts.deferred():  # nested: only the outermost end raises
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.2)
            reached_the_end = True
        assert reached_the_end
    finally:
        restore()


class SignalOnRead(Mapping):
    """Tags that send this process a SIGTERM as they are read: a stop while a run is made."""

    def __init__(self, tags: dict[str, str]):
        self.tags = tags

    def __getitem__(self, key: str) -> str:
        os.kill(os.getpid(), signal.SIGTERM)
        return self.tags[key]

    def __iter__(self):
        return iter(self.tags)

    def __len__(self) -> int:
        return len(self.tags)


def test_a_stop_while_a_nets_run_is_being_made_ends_that_run_killed(tracking_uri):
    import mlflow

    from nws import tracking

    restore = interrupts.install()
    try:
        with pytest.raises(KeyboardInterrupt):
            tracking.start_net_run("net", SignalOnRead({"nws.role": "net"}), {"lr": 0.1})
    finally:
        restore()
    assert mlflow.active_run() is None
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert [(r.info.run_name, r.info.status) for r in runs] == [("net", "KILLED")]
    assert runs[0].data.tags["nws.role"] == "net"
    assert runs[0].data.tags["nws.failure"] == "KeyboardInterrupt: SIGTERM received"
