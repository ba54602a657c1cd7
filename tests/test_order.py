"""Results do not follow worker timing (issue 24): the same campaign sampled by one worker and by
two workers, one of them held stopped most of the time (so the timing differs whatever else loads
the machine), gives the same selection in the same order, the same splits and the same printed
table."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import mlflow
import pytest

from nws import cli
from nws.space import PROPERTY_NAMES
from nws.tracking.tags import TAG_CAMPAIGN, TAG_TRIAL, tag_equals
from nws.zoo.query import query_nets
from nws.zoo.splits import split_nets
from tests.conftest import META_ZOO
from tests.processes import descendants
from tests.test_scale import campaign_trials, wait_until

pytestmark = pytest.mark.slow
FIRST = 20
"""The two-worker campaign samples the meta zoo's first 20 trials, the fewest whose three splits
below all have two nets per class for training and testing (fewer nets, less time)."""
LATER_TRIALS = [f"tags.`{TAG_TRIAL}` != '{t}'" for t in range(FIRST, META_ZOO["n_nets"])]
FIRST_NETS = " and ".join([tag_equals(TAG_CAMPAIGN, META_ZOO["campaign"]), *LATER_TRIALS])
"""The first trials of the campaign (MLflow's filters have no IN or NOT LIKE for tags)."""
TRAIN = ["train", "--props", "initialization,optimizer,batch_size", "--models", "stats", "--K", "1,1",
         "--slice-length", "128", "--seed", "1", "--register", "false", "--filter", FIRST_NETS]  # fmt: skip
RUN_ID = re.compile(r"\b[0-9a-f]{32}\b")


def selection_split_and_table(tracking_uri: str, root, monkeypatch: pytest.MonkeyPatch) -> tuple:
    """What a store gives: its nets in query order, three splits, and `train`'s printed table."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    monkeypatch.setenv("NWS_CACHE_DIR", str(root / "cache"))
    monkeypatch.chdir(root)
    mlflow.set_tracking_uri(tracking_uri)
    try:
        nets = query_nets(["nws"], FIRST_NETS)
        splits = {p: split_nets(nets, p, 0.3, seed=1) for p in ("initialization", "optimizer", "dataset")}
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert cli.main(TRAIN) == 0
    finally:
        mlflow.set_tracking_uri(None)
    return nets, splits, RUN_ID.sub("<run>", out.getvalue())


def workers_of(parent: subprocess.Popen) -> list[int]:
    """The `nws sample` worker processes below the parent."""
    found = []
    for pid in descendants(parent.pid):
        with contextlib.suppress(OSError):
            if b"sample" in open(f"/proc/{pid}/cmdline", "rb").read():  # noqa: SIM115
                found.append(pid)
    return sorted(found)


def slow_down(worker: int, parent: subprocess.Popen, limit: float = 1800) -> None:
    """Keep `worker` stopped most of the time (SIGSTOP for 1.5 s, SIGCONT for 0.3 s) until the
    campaign ends: whatever else loads the machine, it trains fewer nets than the other worker,
    and it is never held for long if it stops while it holds the journal's lock. A campaign
    still running after `limit` seconds is killed (a hang, not a slow machine)."""
    deadline = time.monotonic() + limit
    try:
        while parent.poll() is None:
            if time.monotonic() > deadline:
                parent.kill()
                pytest.fail(f"sample still running after {limit} s")
            os.kill(worker, signal.SIGSTOP)
            with contextlib.suppress(subprocess.TimeoutExpired):
                parent.wait(timeout=1.5)
            os.kill(worker, signal.SIGCONT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                parent.wait(timeout=0.3)
    except ProcessLookupError:
        pass  # the worker has ended
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker, signal.SIGCONT)


def test_two_workers_one_slowed_give_the_one_workers_selection_split_and_table(
    meta_zoo, tmp_path, monkeypatch
):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage = str(tmp_path / "optuna.log")
    args = [item for key, value in META_ZOO.items() for item in (f"--{key.replace('_', '-')}", str(value))]
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "TF_CPP_MIN_LOG_LEVEL": "3"}
    parent = subprocess.Popen(
        [sys.executable, "-m", "nws.cli", "sample", *args, "--target", str(FIRST),
         "--workers", "2", "--storage", storage],
        env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    wait_until(lambda: len(workers_of(parent)) == 2, 300, "two workers", parent)
    slowed, other = workers_of(parent)
    printed: list[str] = []
    reader = threading.Thread(target=lambda: printed.append(parent.stdout.read()), daemon=True)
    reader.start()  # the pipe must not fill while the slowed worker is held

    def slowed_finished_a_net() -> bool:
        trials = campaign_trials(storage, META_ZOO["campaign"])
        mine = [t for t in trials if t.user_attrs.get("worker", "").endswith(f":{slowed}")]
        return any(t.state.name == "COMPLETE" for t in mine) or parent.poll() is not None

    wait_until(slowed_finished_a_net, 600, "the slowed worker's first net")
    slow_down(slowed, parent)  # from its second net on: both workers' nets are in the campaign
    reader.join()
    parent.wait()
    output = "".join(printed)
    assert parent.returncode == 0, output[-3000:]
    by_worker: dict[str, int] = {}
    for trial in campaign_trials(storage, META_ZOO["campaign"]):
        if trial.state.name == "COMPLETE":
            worker = trial.user_attrs["worker"].rsplit(":", 1)[1]
            by_worker[worker] = by_worker.get(worker, 0) + 1
    assert sum(by_worker.values()) == FIRST and len(by_worker) == 2, by_worker
    assert by_worker[str(slowed)] < by_worker[str(other)], by_worker  # the timing really differed

    one = tmp_path / "one"  # a copy of the session's store: `train` adds runs
    one.mkdir()
    shutil.copy(meta_zoo.root / "mlflow.db", one / "mlflow.db")
    one_nets, one_splits, one_table = selection_split_and_table(f"sqlite:///{one / 'mlflow.db'}", one,
                                                                monkeypatch)  # fmt: skip
    two_nets, two_splits, two_table = selection_split_and_table(uri, tmp_path, monkeypatch)
    columns = ["campaign", "trial", "digest", *PROPERTY_NAMES]
    assert len(one_nets) == FIRST and one_nets["trial"].max() == FIRST - 1
    assert one_nets["trial"].tolist() == sorted(one_nets["trial"])
    assert one_nets[columns].equals(two_nets[columns])
    for prop, split in one_splits.items():
        other_split = two_splits[prop]
        for part in ("train", "valid", "test"):
            assert getattr(split, part).tolist() == getattr(other_split, part).tolist(), (prop, part)
    assert "initialization" in one_table and one_table == two_table


def test_the_selection_does_not_follow_run_start_times(meta_zoo, tmp_path, monkeypatch):
    """The session's store with its nets' start times reversed (as if the last trial had started
    first): the same nets in the same order, the same split."""
    import sqlite3

    stores = []
    for name, reverse in (("as-sampled", False), ("reversed", True)):
        root = tmp_path / name
        root.mkdir()
        shutil.copy(meta_zoo.root / "mlflow.db", root / "mlflow.db")
        if reverse:
            with contextlib.closing(sqlite3.connect(root / "mlflow.db")) as db, db:
                db.execute("UPDATE runs SET start_time = 4102444800000 - start_time")
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
        try:
            nets = query_nets(["nws"], tag_equals(TAG_CAMPAIGN, META_ZOO["campaign"]))
            stores.append((nets, split_nets(nets, "initialization", 0.3, seed=1)))
        finally:
            mlflow.set_tracking_uri(None)
    (forward, forward_split), (backward, backward_split) = stores
    assert len(forward) == META_ZOO["n_nets"] and forward["trial"].tolist() == list(range(META_ZOO["n_nets"]))
    assert forward[["run_id", "trial"]].equals(backward[["run_id", "trial"]])
    assert forward_split.test.tolist() == backward_split.test.tolist()
    assert forward_split.train.tolist() == backward_split.train.tolist()
