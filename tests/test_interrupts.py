"""A stop signal whose KeyboardInterrupt a library swallowed still stops the process."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Mapping
from pathlib import Path

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
            # The handler raises in here: it runs in the main thread at its next check, which a
            # signal delivered to another thread may not wake from a sleep, so poll.
            deadline = time.monotonic() + 120
            while not interrupts.requested() and time.monotonic() < deadline:
                time.sleep(0.01)
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


@pytest.mark.parametrize("forget", [True, False], ids=["forgotten", "remembered"])
def test_a_handled_stop_ends_python_m_with_its_exit_code(tmp_path, forget):
    """A stop that landed in code run by `exec` (a dataclass made during an import) and was
    handled: without `forget_unhandled`, `python -m` ends the process by SIGINT instead of 130."""
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "probe.py").write_text(
        "import os, signal, time\n"
        "from nws import interrupts\n"
        "interrupts.install()\n"
        "try:\n"
        # The handler must raise inside the exec'd code: poll there until it has run.
        "    exec('os.kill(os.getpid(), signal.SIGINT)\\n'\n"
        "         'while not interrupts.requested(): time.sleep(0.01)')\n"
        "except KeyboardInterrupt:\n"
        f"    {'interrupts.forget_unhandled()' if forget else 'pass'}\n"
        "raise SystemExit(130)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(interrupts.__file__).parents[1])}
    done = subprocess.run([sys.executable, "-m", "probe"], cwd=tmp_path, env=env, timeout=60)
    assert done.returncode == (130 if forget else -signal.SIGINT)


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

    from nws.tracking.runs import start_net_run

    restore = interrupts.install()
    try:
        with pytest.raises(KeyboardInterrupt):
            start_net_run("net", SignalOnRead({"nws.role": "net"}), {"lr": 0.1})
    finally:
        restore()
    assert mlflow.active_run() is None
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert [(r.info.run_name, r.info.status) for r in runs] == [("net", "KILLED")]
    assert runs[0].data.tags["nws.role"] == "net"
    assert runs[0].data.tags["nws.failure"] == "KeyboardInterrupt: SIGTERM received"


@pytest.mark.slow
def test_a_stop_during_training_is_raised_between_two_steps_of_keras():
    """Not at whatever line of Keras or TensorFlow runs when the signal comes (there it was
    swallowed or turned into another error): the signal is held, and raised by the callback
    before the next step."""
    import threading
    import traceback

    from nws.data import load_images, split_for_net
    from nws.net.training import TrainSettings, train_net
    from nws.space import NetConfig

    data = split_for_net(load_images("shapes"), seed=4, max_train_images=64, max_eval_images=32)
    config = NetConfig.parse("shapes,0.002,32,1,1,0,0,2,3,3,2,4,64")  # augmentation on
    epochs: list[int] = []

    def signal_during_the_next_epoch(_model, epoch, _metrics):
        epochs.append(epoch)
        if epoch == 1:
            threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGTERM)).start()

    restore = interrupts.install()
    try:
        with pytest.raises(KeyboardInterrupt) as stopped:
            train_net(
                config, data, 5, TrainSettings(max_epochs=200, min_epochs=200), [signal_during_the_next_epoch]
            )
    finally:
        restore()
    assert stopped.value.args == ("SIGTERM received",)  # interrupts.check(), not the handler itself
    raised_in = [frame.name for frame in traceback.extract_tb(stopped.value.__traceback__)][-2]
    assert raised_in in ("on_epoch_begin", "on_train_batch_begin", "on_test_batch_begin")
    assert 1 in epochs and len(epochs) < 200


def test_a_parent_run_ends_killed_on_an_interrupt_failed_on_an_error_finished_otherwise(tracking_uri):
    import mlflow

    from nws.processes import worker_name
    from nws.tracking.runs import parent_run

    outcomes = {  # what the block raises: the run's status, its nws.failure
        "interrupt": (KeyboardInterrupt("SIGINT received"), "KILLED", "KeyboardInterrupt: SIGINT received"),
        "error": (ValueError("bad"), "FAILED", "ValueError: bad"),
        "success": (None, "FINISHED", None),
    }
    for name, (raised, status, failure) in outcomes.items():
        try:
            with parent_run({"nws.role": "campaign"}, {"n_nets": 3}, run_name=name) as run:
                if raised is not None:
                    raise raised
        except (KeyboardInterrupt, ValueError) as error:
            assert error is raised
        assert mlflow.active_run() is None
        ended = mlflow.get_run(run.info.run_id)
        assert (ended.info.run_name, ended.info.status) == (name, status)
        assert ended.data.params == {"n_nets": "3"}
        assert ended.data.tags["nws.role"] == "campaign"
        assert ended.data.tags["nws.worker"] == worker_name()
        assert ended.data.tags.get("nws.failure") == failure

    # A caller's active run (`main`'s around `sample`) is used, and never ended here; a nested
    # one is started and ended here.
    with mlflow.start_run(run_name="caller") as caller:
        with (
            pytest.raises(KeyboardInterrupt),
            parent_run(run_name="child", nested=True) as child,
            parent_run({"nws.role": "campaign"}, {"seed": 1}) as continued,
        ):
            assert continued.info.run_id == child.info.run_id
            raise KeyboardInterrupt
        assert mlflow.active_run().info.run_id == caller.info.run_id
        assert mlflow.get_run(caller.info.run_id).info.status == "RUNNING"
    child_run = mlflow.get_run(child.info.run_id)
    assert child_run.info.status == "KILLED"
    assert child_run.data.tags["mlflow.parentRunId"] == caller.info.run_id
    assert child_run.data.tags["nws.role"] == "campaign" and child_run.data.params == {"seed": "1"}
    assert mlflow.get_run(caller.info.run_id).info.status == "FINISHED"


@pytest.mark.slow
def test_sample_processes_stopped_at_different_moments_exit_130_with_every_run_killed(tmp_path):
    """Real `nws sample` processes, side by side: SIGINT as the first net starts (its data, its
    run, the first evaluation), SIGTERM in Keras' fit. Each exits 130 (no native abort, no other
    error), and its campaign leaves nothing RUNNING. `benchmarks/interrupt_stress.py` does this
    20 times at random moments."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.interruptions import interrupt_mid_net, run_statuses, start_sample, tracking_store, unended

    uri, storage = tracking_store(tmp_path), str(tmp_path / "optuna.log")
    moments = {"start": (signal.SIGINT, 0.0, "net 1/"), "fit": (signal.SIGTERM, 0.3, "epoch 1/")}
    samples = {name: start_sample(name, uri, storage, tmp_path) for name in moments}
    with ThreadPoolExecutor(len(moments)) as pool:  # each signal at its own moment
        sent = {name: pool.submit(interrupt_mid_net, samples[name], *moments[name]) for name in moments}
    for name in moments:
        assert sent[name].result(), "".join(samples[name].output)[-3000:]
        code, output = samples[name].finish(120)
        assert code == 130, output[-3000:]
        assert output.rstrip().endswith("nws sample: interrupted"), output[-3000:]
        assert unended(uri, storage, name) == [], output[-3000:]
        runs = run_statuses(uri, name)
        assert runs["campaign"] == ["KILLED"]
        if name != "start":  # the first net's run may not exist yet at the start
            assert runs["net"] == ["KILLED"], output[-3000:]


@contextlib.contextmanager
def signal_when(condition, number: int = signal.SIGTERM, delay: float = 0.0):
    """Send this process a stop signal once `condition()` holds, checked from another thread (as
    a user's Ctrl-C comes at a moment of its own) for as long as the block runs: no deadline to
    guess on a busy machine, and no signal after the block."""
    import threading

    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            if condition():
                time.sleep(delay)
                if not done.is_set():
                    os.kill(os.getpid(), number)
                return
            done.wait(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()


def runs_by_name() -> dict[str, object]:
    import mlflow

    return {r.info.run_name: r for r in mlflow.search_runs(search_all_experiments=True, output_format="list")}


def main_options(tmp_path, campaign: str, **changes):
    from nws.commands.main import MainOptions

    tiny = {"datasets": "digits", "max_train_images": 64, "max_eval_images": 32, "threads": 1, "workers": 1,
            "storage": str(tmp_path / "optuna.log"), "campaign": campaign}  # fmt: skip
    return MainOptions(**{**tiny, **changes})


@pytest.mark.slow
def test_main_interrupted_ends_its_runs_killed_and_failing_ends_them_failed(tracking_uri, tmp_path):
    from mlflow import MlflowClient

    from nws.commands.main import run_main
    from nws.errors import ParameterError
    from nws.tracking.experiments import working_experiment

    client = MlflowClient()

    def mid_net() -> bool:
        nets = client.search_runs([working_experiment()], "tags.`nws.role` = 'net'")
        return bool(nets) and bool(client.get_metric_history(nets[0].info.run_id, "train_accuracy"))

    restore = interrupts.install()
    try:
        with signal_when(mid_net, signal.SIGINT), pytest.raises(KeyboardInterrupt):
            run_main(main_options(tmp_path, "stopped", n_nets=2, max_epochs=100, min_epochs=100))
    finally:
        restore()
    with pytest.raises(ParameterError, match="no requested property varies"):  # one net: nothing to learn
        run_main(main_options(tmp_path, "fails", n_nets=1, max_epochs=0, min_epochs=0))

    runs = runs_by_name()
    assert {name: run.info.status for name, run in runs.items()} == {
        "nws-main-stopped": "KILLED", "sample-stopped": "KILLED", "net-stopped-00000": "KILLED",
        "nws-main-fails": "FAILED", "sample-fails": "FINISHED", "net-fails-00000": "FINISHED",
        "meta-fails": "FAILED",
    }  # fmt: skip
    assert runs["nws-main-stopped"].data.tags["nws.failure"] == "KeyboardInterrupt: SIGINT received"
    import optuna

    from nws.campaign.storage import open_storage

    stopped = optuna.load_study(study_name="stopped", storage=open_storage(str(tmp_path / "optuna.log")))
    first, queued = stopped.get_trials(deepcopy=False)  # the stopped net comes first next time
    assert (first.state.name, queued.state.name) == ("FAIL", "WAITING")
    assert queued.params == first.params and queued.system_attrs["retry_history"] == [first.number]
    assert runs["nws-main-fails"].data.tags["nws.failure"].startswith("ParameterError: props: no requested")


def test_train_interrupted_ends_its_run_and_the_model_being_trained_killed(in_meta_zoo, monkeypatch):
    import mlflow
    from mlflow import MlflowClient

    from nws.commands.train import TrainOptions, run_training

    client = MlflowClient()
    experiment = client.create_experiment("interrupted-train")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "interrupted-train")

    def training_a_model() -> bool:
        return bool(client.search_runs([experiment], "tags.`nws.role` = 'meta-classifier'"))

    plain = "params.initialization != 'glorot_uniform' and params.initialization != 'glorot_normal'"
    options = TrainOptions(experiment="nws", filter=plain, props="initialization", K="1,1", slice_length=128,
                           models="dmc",
                           steps=0, epochs=5000, batch_size=16, register=False)  # fmt: skip
    restore = interrupts.install()
    try:
        with signal_when(training_a_model, signal.SIGTERM, delay=0.5), pytest.raises(KeyboardInterrupt):
            run_training(options)
    finally:
        restore()
    runs = mlflow.search_runs([experiment], output_format="list")
    ended = {(r.data.tags["nws.role"], r.info.status) for r in runs}
    assert ended == {("meta", "KILLED"), ("meta-classifier", "KILLED")}


def test_a_stop_while_another_process_holds_the_journal_lock_waits_for_the_write(tmp_path):
    """Optuna's journal lock is a symbolic link next to the journal. A stop that lands while a
    write waits for another process's lock must neither remove that lock nor cut the write: the
    record is written once the lock is free, and the next check raises the stop."""
    import json
    import threading

    from nws.campaign.storage import _journal_file

    path = tmp_path / "journal.log"
    journal = _journal_file(str(path))
    lock = Path(f"{path}.lock")
    os.symlink(path, lock)  # held by another process
    seen: dict[str, bool] = {}

    def other_process() -> None:
        give_up = time.monotonic() + 120  # only a broken product waits this long
        while not interrupts._deferring and time.monotonic() < give_up:  # our write waits for the lock
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)
        while not interrupts.requested():  # the stop reached the handler
            time.sleep(0.01)
        seen["lock kept"] = lock.is_symlink()
        lock.unlink()  # the other process is done

    restore = interrupts.install()
    helper = threading.Thread(target=other_process, daemon=True)
    try:
        helper.start()
        journal.append_logs([{"op_code": 0, "worker_id": "w", "study_name": "s"}])
        assert interrupts.requested() == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            interrupts.check()
    finally:
        restore()
    helper.join()
    assert seen == {"lock kept": True}
    assert [json.loads(line)["study_name"] for line in path.read_text().splitlines()] == ["s"]
    assert not lock.exists()
