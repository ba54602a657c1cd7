"""Scale-out and faults on real servers (127.0.0.1 only): PostgreSQL for the Optuna study and
for MLflow's backend store, an `mlflow server` subprocess, worker processes started as a user
would (`python -m nws.cli sample ...`). Nets are tiny so this stays within a few minutes."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import free_port

pytestmark = pytest.mark.slow  # scale-out: servers, worker processes, kills

TINY = "--subset fixed --datasets digits --prints 3 --max-epochs 1 --min-epochs 1 --max-train-images 64 "
TINY = (TINY + "--max-eval-images 32 --threads 1").split()


def sample(*args: str, tracking_uri: str, cwd: Path, **popen: object) -> subprocess.Popen:
    # MLflow's own retry policy, with a shorter backoff than its default (2) to keep the
    # server-restart test short.
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "TF_CPP_MIN_LOG_LEVEL": "3",
           "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}  # fmt: skip
    return subprocess.Popen([sys.executable, "-m", "nws.cli", "sample", *TINY, *args], env=env, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)  # fmt: skip


def finish(process: subprocess.Popen, timeout: float = 240) -> str:
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        pytest.fail(f"sample did not end within {timeout} s:\n{output[-3000:]}")
    return output


@functools.cache
def storage_of(url: str):
    """One storage (one connection pool) per URL for all the polling of a test."""
    from nws.campaign.storage import open_storage

    return open_storage(url)


def load_study(storage: str, campaign: str):
    import optuna

    return optuna.load_study(study_name=campaign, storage=storage_of(storage))


def wait_until(condition, timeout: float, what: str, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if process is not None and process.poll() is not None:
            pytest.fail(f"sample ended before {what}:\n{process.communicate()[0][-3000:]}")
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what}")


def campaign_trials(storage: str, campaign: str) -> list:
    """A campaign's trials; none while its study does not exist yet."""
    try:
        return load_study(storage, campaign).get_trials(deepcopy=False)
    except KeyError:
        return []


def finished_count(storage: str, campaign: str) -> int:
    return sum(t.state.name == "COMPLETE" for t in campaign_trials(storage, campaign))


def states(study) -> dict[str, int]:
    counts: dict[str, int] = {}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
    return counts


def net_runs(client, campaign: str, status: str = "") -> list:
    condition = f"tags.`nws.role` = 'net' and tags.`nws.campaign` = '{campaign}'"
    if status:
        condition += f" and attributes.status = '{status}'"
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, condition, max_results=1000)


def mid_net(storage: str, campaign: str, pid: int, tracking_uri: str) -> bool:
    """Whether the worker with this pid has trained an epoch of a net that is not done."""
    from mlflow import MlflowClient

    for trial in campaign_trials(storage, campaign):
        run_id = trial.user_attrs.get("mlflow_run_id")
        mine = trial.user_attrs.get("worker", "").endswith(f":{pid}")
        if trial.state.name == "RUNNING" and mine and run_id:
            return bool(MlflowClient(tracking_uri).get_metric_history(run_id, "train_accuracy"))
    return False


def victim_and_survivor(
    servers, campaign: str, target: int
) -> tuple[str, subprocess.Popen, subprocess.Popen]:
    """Two workers on one campaign (heartbeat 1 s, nets of 3 epochs); returns once the first,
    the victim, is mid-net. The Optuna storage is a new PostgreSQL database."""
    postgres, server, root = servers
    storage = postgres.database(f"optuna_{campaign}")
    args = ["--target", str(target), "--storage", storage, "--campaign", campaign, "--heartbeat", "1",
            "--max-epochs", "3", "--min-epochs", "3", "--max-train-images", "256"]  # fmt: skip
    victim = sample(*args, tracking_uri=server.url, cwd=root)
    survivor = sample(*args, tracking_uri=server.url, cwd=root)
    wait_until(lambda: mid_net(storage, campaign, victim.pid, server.url), 180, "the victim to be mid-net",
               victim)  # fmt: skip
    return storage, victim, survivor


@pytest.fixture
def servers(postgres, mlflow_server, tmp_path):
    """PostgreSQL (the Optuna study's database is made per test) and the session's mlflow server
    on PostgreSQL."""
    return postgres, mlflow_server, tmp_path


@pytest.fixture
def client(servers, monkeypatch: pytest.MonkeyPatch):
    import mlflow
    from mlflow import MlflowClient

    _, server, _ = servers
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    mlflow.set_tracking_uri(server.url)
    yield MlflowClient(server.url)
    mlflow.set_tracking_uri(None)


def test_three_workers_reach_the_target_exactly_through_a_tracking_server_restart(servers, client):
    postgres, server, root = servers
    storage = postgres.database("optuna_three")
    target = 4
    process = sample("--workers", "3", "--target", str(target), "--storage", storage, "--campaign", "three",
                     "--heartbeat", "2", "--max-epochs", "0", "--min-epochs", "0",  # nets of one evaluation
                     tracking_uri=server.url, cwd=root)  # fmt: skip
    wait_until(lambda: finished_count(storage, "three") >= 1, 180, "a finished net", process)
    server.stop()  # workers are mid-campaign: their MLflow calls retry until the server is back
    time.sleep(1)
    server.start()
    output = finish(process)
    assert process.returncode == 0, output[-3000:]

    study = load_study(storage, "three")
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    assert len(complete) == target
    finished = net_runs(client, "three", "FINISHED")
    assert len(finished) == target
    assert {t.user_attrs["mlflow_run_id"] for t in complete} == {r.info.run_id for r in finished}
    configs = {tuple(sorted(t.params.items())) for t in complete}
    assert len(configs) == target
    assert len({r.data.params["seed"] for r in finished}) == target
    assert len({t.user_attrs["worker"] for t in complete}) >= 2  # the work was shared
    worker_of = {t.user_attrs["mlflow_run_id"]: t.user_attrs["worker"] for t in complete}
    assert all(r.data.tags["nws.worker"] == worker_of[r.info.run_id] for r in finished)
    campaign = client.search_runs([finished[0].info.experiment_id], "tags.`nws.role` = 'campaign'")
    parent = finished[0].data.tags["mlflow.parentRunId"]
    assert all(r.data.tags["mlflow.parentRunId"] == parent for r in finished)
    assert any(r.info.run_id == parent and r.info.status == "FINISHED" for r in campaign)
    for run in finished:  # every finished net has its snapshots on the server's artifact store
        assert {a.path for a in client.list_artifacts(run.info.run_id, "snapshots")} >= {
            "snapshots/weights.npy", "snapshots/layout.json"}  # fmt: skip


def test_a_worker_killed_mid_net_is_detected_and_its_net_retried(servers, client):

    from nws.commands.options import Selection

    target = 2
    storage, doomed, survivor = victim_and_survivor(servers, "kill", target)
    doomed.send_signal(signal.SIGKILL)
    doomed.wait()
    output = finish(survivor)
    assert survivor.returncode == 0, output[-3000:]

    import optuna

    study = load_study(storage, "kill")
    trials = study.get_trials(deepcopy=False)
    killed = [t for t in trials if t.user_attrs.get("worker", "").endswith(f":{doomed.pid}")
              and t.state.name != "COMPLETE"]  # fmt: skip
    assert len(killed) == 1 and killed[0].state.name == "FAIL"
    killed_run = client.get_run(killed[0].user_attrs["mlflow_run_id"])
    assert killed_run.info.status == "FAILED"
    assert "died" in killed_run.data.tags["nws.failure"]
    retries = [t for t in trials if optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(t)
               == killed[0].number]  # fmt: skip
    assert len(retries) == 1 and retries[0].state.name == "COMPLETE"
    assert retries[0].params == killed[0].params
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(complete) == target
    assert len(net_runs(client, "kill", "FINISHED")) == target
    selected = Selection(filter="tags.`nws.campaign` = 'kill'").query()
    assert len(selected) == target
    assert killed_run.info.run_id not in set(selected["run_id"])


def test_a_worker_judged_dead_while_suspended_drops_its_net_when_it_wakes(servers, client):
    """A live worker that missed its heartbeats (suspended) has its trial failed and retried by
    another; when it wakes and finishes that net, the net is not counted: the campaign still
    ends with exactly `target` finished nets, and both workers exit cleanly."""
    target = 2
    storage, sleeper, survivor = victim_and_survivor(servers, "stop", target)
    sleeper.send_signal(signal.SIGSTOP)

    def sleepers_trial_failed() -> bool:
        return any(t.state.name == "FAIL" and t.user_attrs.get("worker", "").endswith(f":{sleeper.pid}")
                   for t in campaign_trials(storage, "stop"))  # fmt: skip

    try:
        wait_until(sleepers_trial_failed, 120, "the suspended worker's trial to be failed as stale")
    finally:
        sleeper.send_signal(signal.SIGCONT)
    outputs = finish(sleeper), finish(survivor)
    assert (sleeper.returncode, survivor.returncode) == (0, 0), "\n".join(o[-2000:] for o in outputs)
    assert "taken over" in outputs[0]

    trials = load_study(storage, "stop").get_trials(deepcopy=False)
    stale = [
        t
        for t in trials
        if t.state.name == "FAIL" and t.user_attrs.get("worker", "").endswith(f":{sleeper.pid}")
    ]
    run = client.get_run(stale[0].user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED"
    assert run.data.tags["nws.failure"].startswith("taken over")
    assert sum(t.state.name == "COMPLETE" for t in trials) == target
    finished = net_runs(client, "stop", "FINISHED")
    assert len(finished) == target
    assert run.info.run_id not in {r.info.run_id for r in finished}


def test_journal_campaign_stopped_and_resumed_ends_at_the_target(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage = str(tmp_path / "journal.log")
    target = 8  # nets of one evaluation are quick: room for the stop to land before the target
    args = ["--workers", "2", "--target", str(target), "--storage", storage, "--campaign", "resume",
            "--max-epochs", "0", "--min-epochs", "0"]  # fmt: skip
    first = sample(*args, tracking_uri=uri, cwd=tmp_path)

    def one_finished() -> bool:
        return Path(storage).exists() and finished_count(storage, "resume") >= 1

    wait_until(one_finished, 180, "a finished net", first)
    first.send_signal(signal.SIGTERM)  # as a scheduler would; the parent passes it on
    stopping = finish(first, 60)
    assert first.returncode != 0, stopping[-3000:]
    stopped = states(load_study(storage, "resume"))
    assert 1 <= stopped.get("COMPLETE", 0) < target, (stopped, stopping[-6000:])
    assert stopped.get("RUNNING", 0) == 0, (stopped, stopping[-6000:])

    second = sample(*args[2:], tracking_uri=uri, cwd=tmp_path)  # one process this time
    output = finish(second)
    assert second.returncode == 0, output[-3000:]
    assert states(load_study(storage, "resume"))["COMPLETE"] == target
    client = MlflowClient(uri)
    assert len(net_runs(client, "resume", "FINISHED")) == target
    ended = {"FINISHED", "KILLED", "FAILED"}
    unended = [(r.info.run_name, r.info.status, r.data.tags.get("nws.worker"))
               for r in net_runs(client, "resume") if r.info.status not in ended]  # fmt: skip
    assert not unended, (unended, stopping[-6000:])
    nws = client.get_experiment_by_name("nws").experiment_id
    campaigns = client.search_runs([nws], "tags.`nws.role` = 'campaign'")
    assert sorted(r.info.status for r in campaigns) == ["FINISHED", "KILLED"]


@pytest.mark.parametrize("what", ["storage", "tracking"])
def test_an_unreachable_server_is_one_line_within_seconds(what, tmp_path):
    dead = f"127.0.0.1:{free_port()}"
    storage = f"postgresql://nws@{dead}/optuna" if what == "storage" else str(tmp_path / "j.log")
    tracking = f"http://{dead}" if what == "tracking" else f"sqlite:///{tmp_path / 'm.db'}"
    started = time.monotonic()
    process = sample("--storage", storage, tracking_uri=tracking, cwd=tmp_path)
    output = finish(process, 120)
    assert process.returncode == 2
    assert time.monotonic() - started < 60
    errors = [line for line in output.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and ("unreachable" in errors[0] or "cannot open" in errors[0]), output
    assert "Traceback" not in output


def test_on_a_journal_file_a_gone_process_trial_is_failed_and_retried(tmp_path):
    import socket

    import optuna

    from nws.campaign.storage import open_storage
    from nws.campaign.trials import fail_orphaned_trials

    study = optuna.create_study(study_name="orphans", storage=open_storage(str(tmp_path / "j.log")))
    gone = subprocess.Popen(["true"])
    gone.wait()
    orphan, alive = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)}), study.ask()
    orphan.set_user_attr("worker", f"{socket.gethostname()}:{gone.pid}")
    alive.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    assert fail_orphaned_trials(study) == [orphan.number]
    trials = study.get_trials(deepcopy=False)
    assert [t.state.name for t in trials] == ["FAIL", "RUNNING", "WAITING"]
    assert trials[2].params == trials[0].params
    assert optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(trials[2]) == orphan.number


def test_a_trial_stopped_by_a_signal_is_queued_again_once(tmp_path):
    """Ctrl-C or Slurm's SIGTERM fails the trial; its configuration is queued once (not again when
    another worker already retried it), and a trial that drew nothing is not queued."""
    import optuna

    from nws.campaign.storage import open_storage
    from nws.campaign.trials import retry_interrupted

    study = optuna.create_study(study_name="stopped", storage=open_storage(str(tmp_path / "j.log")))
    drew = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    study.tell(drew, state=optuna.trial.TrialState.FAIL)
    empty = study.ask()
    study.tell(empty, state=optuna.trial.TrialState.FAIL)
    done = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    study.tell(done, 1.0)
    for number in (drew.number, drew.number, empty.number, done.number, 99):
        retry_interrupted(study, number)
    trials = study.get_trials(deepcopy=False)
    assert [t.state.name for t in trials] == ["FAIL", "FAIL", "COMPLETE", "WAITING"]
    assert trials[3].params == trials[0].params
    assert trials[3].system_attrs["retry_history"] == [drew.number]


@pytest.fixture(scope="module")
def killed_mid_net(tmp_path_factory):
    """Two `nws sample` processes (campaigns "orphan-a", "orphan-b" on one journal file and one
    SQLite store), each killed with SIGKILL mid-net: nothing of theirs got the chance to end
    their net's run, their campaign's run or their trial."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.interruptions import interrupt_mid_net, start_sample, tracking_store

    root = tmp_path_factory.mktemp("orphans")
    uri, storage = tracking_store(root), str(root / "optuna.log")
    samples = {name: start_sample(name, uri, storage, root) for name in ("orphan-a", "orphan-b")}
    with ThreadPoolExecutor(len(samples)) as pool:
        killed = {
            name: pool.submit(interrupt_mid_net, s, signal.SIGKILL, 0.0, "epoch 0/")
            for name, s in samples.items()
        }
    for name, sample in samples.items():
        code, output = sample.finish(60)
        assert killed[name].result() and code == -signal.SIGKILL, output[-3000:]
    return root, uri, storage, {name: s.process.pid for name, s in samples.items()}


@pytest.fixture
def orphans(killed_mid_net, monkeypatch):
    import mlflow

    root, uri, storage, pids = killed_mid_net
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(root)
    mlflow.set_tracking_uri(uri)
    yield uri, storage, pids
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


def campaign_runs(campaign: str) -> dict[str, list]:
    """A campaign's MLflow runs by role."""
    import mlflow

    found: dict[str, list] = {}
    query = f"tags.`nws.campaign` = '{campaign}'"
    for run in mlflow.search_runs(search_all_experiments=True, filter_string=query, output_format="list"):
        found.setdefault(run.data.tags["nws.role"], []).append(run)
    return found


def test_cleanup_lists_a_killed_processs_runs_and_trial_and_closes_them(orphans, capsys):
    import socket

    import optuna
    from mlflow import MlflowClient

    from nws.cli import main

    _, storage, pids = orphans
    worker = f"{socket.gethostname()}:{pids['orphan-a']}"
    before = campaign_runs("orphan-a")
    assert [r.info.status for r in before["net"] + before["campaign"]] == ["RUNNING", "RUNNING"]
    assert {r.data.tags["nws.worker"] for r in before["net"] + before["campaign"]} == {worker}
    client = MlflowClient()
    nws = client.get_experiment_by_name("nws").experiment_id
    elsewhere, alive = (client.create_run(nws, tags={"nws.campaign": "orphan-a", "nws.role": "net",
                                                     "nws.worker": name}).info.run_id
                        for name in ("elsewhere:7", f"{socket.gethostname()}:{os.getpid()}"))  # fmt: skip
    command = ["cleanup", "--campaign", "orphan-a", "--storage", storage]

    assert main([*command, "--dry-run", "true"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert listed[-1] == "campaign orphan-a: 5 running, 3 would be closed, 2 left running"
    assert sum(f"worker {worker} (gone): would be closed" in line for line in listed) == 3
    assert any(line.startswith("trial 0: ") for line in listed)
    assert f"net run {elsewhere}: worker elsewhere:7 (other host): left running" in listed
    assert all(r.info.status == "RUNNING" for r in campaign_runs("orphan-a")["net"])

    assert main(command) == 0
    assert (
        capsys.readouterr().out.splitlines()[-1] == "campaign orphan-a: 5 running, 3 closed, 2 left running"
    )
    after = {r.info.run_id: r for runs in campaign_runs("orphan-a").values() for r in runs}
    for run in before["net"] + before["campaign"]:
        closed = after[run.info.run_id]
        assert closed.info.status == "FAILED" and worker in closed.data.tags["nws.failure"]
    assert after[elsewhere].info.status == "RUNNING" and after[alive].info.status == "RUNNING"
    study = load_study(storage, "orphan-a")
    trials = study.get_trials(deepcopy=False)
    assert [t.state.name for t in trials] == ["FAIL", "WAITING"]  # failed, and queued again
    assert trials[1].params == trials[0].params
    assert optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(trials[1]) == 0
    assert trials[0].user_attrs["mlflow_run_id"] == before["net"][0].info.run_id

    assert main([*command, "--all-hosts", "true"]) == 0  # closes what it cannot check, never a live one
    assert (
        capsys.readouterr().out.splitlines()[-1] == "campaign orphan-a: 2 running, 1 closed, 1 left running"
    )
    assert client.get_run(elsewhere).info.status == "FAILED"
    assert client.get_run(alive).info.status == "RUNNING"


def test_a_resumed_campaign_closes_its_killed_processs_runs_and_retries_its_trial(orphans):
    from nws.commands.sample import SampleOptions, run_campaign

    _, storage, pids = orphans
    before = campaign_runs("orphan-b")
    options = SampleOptions(n_nets=1, subset="fixed", datasets="digits", prints=3, max_epochs=0, min_epochs=0,
                            max_train_images=64, max_eval_images=32, threads=1, campaign="orphan-b",
                            storage=storage)  # fmt: skip
    summary = run_campaign(options)
    assert len(summary.finished) == 1
    after = {r.info.run_id: r for runs in campaign_runs("orphan-b").values() for r in runs}
    for run in before["net"] + before["campaign"]:
        assert after[run.info.run_id].info.status == "FAILED"
        assert f":{pids['orphan-b']}" in after[run.info.run_id].data.tags["nws.failure"]
    assert after[summary.campaign_run_id].info.status == "FINISHED"
    trials = load_study(storage, "orphan-b").get_trials(deepcopy=False)
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]  # the retry trained in this call
    assert trials[1].params == trials[0].params
    assert trials[1].user_attrs["mlflow_run_id"] == summary.finished[0]
