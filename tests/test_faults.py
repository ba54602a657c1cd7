"""Real faults, as an operator meets them: a filesystem that fills up (a small tmpfs, mounted by
the test: root only), a torn journal record, a tracking server that stays away past MLflow's
retry window. Every wait is for something observable (a line, a file, a run's status)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_scale import TINY, finished_count, load_study, net_runs, states

pytestmark = pytest.mark.slow  # campaigns of tiny nets in subprocesses

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="mounts a small tmpfs to fill a real filesystem: needs root (CI runs as root)"
)


@contextlib.contextmanager
def small_filesystem(where: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted at `where`, unmounted afterwards."""
    where.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                             capture_output=True, text=True)  # fmt: skip
    if mounted.returncode != 0:  # root without the right to mount (a container without CAP_SYS_ADMIN)
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def grow(where: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(where)], check=True)


def start(command: str, *args: str, tracking_uri: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "TF_CPP_MIN_LOG_LEVEL": "3"}
    extra = TINY if command == "sample" else []
    # Output to files, not pipes: a test that waits on something else meanwhile cannot block it.
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed in ended)
    process = subprocess.Popen([sys.executable, "-m", "nws.cli", command, *extra, *args], env=env, cwd=cwd,
                               stdout=out, stderr=err, text=True)  # fmt: skip
    process.outputs = (out, err)
    return process


def ended(process: subprocess.Popen) -> subprocess.CompletedProcess:
    process.wait(timeout=600)
    texts = []
    for file in process.outputs:
        file.seek(0)
        texts.append(file.read())
        file.close()
    return subprocess.CompletedProcess(process.args, process.returncode, *texts)


def nws(command: str, *args: str, tracking_uri: str, cwd: Path) -> subprocess.CompletedProcess:
    return ended(start(command, *args, tracking_uri=tracking_uri, cwd=cwd))


LEFT_FREE = 16 * 1024
"""Bytes left free on a filesystem filled mid-campaign: less than a net's next writes need."""


def fill_after_the_first_net(process: subprocess.Popen, full: Path, journal: Path, campaign: str) -> Path:
    """Once the campaign holds a finished net (or the process has ended), fill `full` to within
    LEFT_FREE bytes with a file, returned: the disk fills at a net's writes whatever the speed
    of the machine or the size of the store's schema."""
    while finished_count(str(journal), campaign) < 1 and process.poll() is None:
        time.sleep(0.2)
    stat = os.statvfs(full)
    filler = full / "filler"
    filler.write_bytes(bytes(max(0, stat.f_bavail * stat.f_frsize - LEFT_FREE)))
    return filler


@needs_root
def test_a_journal_torn_by_a_full_disk_heals_and_the_resume_ends_at_the_target(tmp_path):
    """The journal fills its filesystem mid-campaign: a write stops halfway. The resume (after
    space is freed) cuts the torn record under the journal's lock, says so in one line, and
    ends at the target; `cleanup` works on the same journal."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    target = 4
    with small_filesystem(tmp_path / "full", "12k") as full:
        journal = full / "journal.log"
        args = ["--target", str(target), "--storage", str(journal), "--campaign", "torn",
                "--max-epochs", "0", "--min-epochs", "0"]  # fmt: skip
        first = nws("sample", *args, tracking_uri=uri, cwd=tmp_path)
        assert first.returncode != 0, first.stderr[-3000:]
        content = journal.read_bytes()
        assert content and not content.endswith(b"\n"), "the journal's last record should be torn"
        errors = [line for line in first.stderr.splitlines() if "error" in line.lower()]
        assert len(errors) == 1, first.stderr[-3000:]
        assert "no space left" in errors[0] and str(full) in errors[0], errors
        assert "Traceback" not in first.stderr, first.stderr[-3000:]

        grow(full, "4m")
        second = nws("sample", *args, tracking_uri=uri, cwd=tmp_path)
        assert second.returncode == 0, second.stderr[-3000:]
        healed = [line for line in second.stderr.splitlines() if "torn" in line]
        assert len(healed) == 1 and str(journal) in healed[0], second.stderr[-3000:]
        assert journal.read_bytes().endswith(b"\n")
        assert finished_count(str(journal), "torn") == target
        assert states(load_study(str(journal), "torn")).get("RUNNING", 0) == 0
        assert len(net_runs(MlflowClient(uri), "torn", "FINISHED")) == target

        cleanup = nws("cleanup", "--storage", str(journal), tracking_uri=uri, cwd=tmp_path)
        assert cleanup.returncode == 0, cleanup.stderr[-3000:]


def test_a_journal_with_a_record_glued_onto_a_torn_one_is_healed(tmp_path):
    """Journals that an earlier version broke (its resume appended onto a torn record) read
    again: the torn start is dropped, the record glued onto it kept."""
    import optuna

    from nws.campaign.storage import open_storage

    journal = tmp_path / "journal.log"
    study = optuna.create_study(study_name="glued", storage=open_storage(str(journal)))
    study.set_user_attr("lost", 1)  # its record torn by a write that stopped halfway...
    torn_at = len(journal.read_bytes().splitlines())
    study.enqueue_trial({"x": 0.5})  # ...these records appended onto it
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    study.set_user_attr("kept", 2)
    lines = journal.read_bytes().splitlines(keepends=True)
    torn = lines[torn_at - 1][:-20]
    journal.write_bytes(b"".join(lines[: torn_at - 1]) + torn + b"".join(lines[torn_at:]))
    with pytest.raises(ValueError):
        list(optuna.storages.journal.JournalFileBackend(str(journal)).read_logs(0))

    healed = optuna.load_study(study_name="glued", storage=open_storage(str(journal)))
    assert [(t.number, t.params) for t in healed.get_trials()] == [(trial.number, {"x": 0.5})]
    assert healed.user_attrs == {"kept": 2}
    assert journal.read_bytes() == b"".join(lines[: torn_at - 1] + lines[torn_at:])


def lines_of(process: subprocess.Popen) -> tuple[list[str], threading.Event]:
    """The process's output lines as they come (read by a thread), and an event set on each."""
    lines: list[str] = []
    arrived = threading.Event()

    def read() -> None:
        for line in process.stdout:
            lines.append(line)
            arrived.set()
        arrived.set()

    threading.Thread(target=read, daemon=True).start()
    return lines, arrived


def wait_for_line(lines: list[str], arrived: threading.Event, process: subprocess.Popen, text: str) -> None:
    """Wait until a line holding `text` came (fail if the process ended first)."""
    deadline = time.monotonic() + 300
    while not any(text in line for line in lines):
        if process.poll() is not None and not any(text in line for line in lines):
            arrived.wait(1)
            if not any(text in line for line in lines):
                pytest.fail(f"the process ended before {text!r}:\n{''.join(lines)[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {text!r} within 300 s:\n{''.join(lines)[-3000:]}")
        arrived.wait(1)
        arrived.clear()


def test_a_net_whose_tracking_server_stayed_away_never_ends_finished(tmp_path):
    """The server goes away mid-net for longer than MLflow's retry window (shortened by MLflow's
    own knobs) and comes back as soon as the error is printed: MLflow's exit hook used to end
    the net's run FINISHED, empty. Now nws ends it FAILED (or leaves it RUNNING for `cleanup`)."""
    from mlflow import MlflowClient

    from tests.conftest import MlflowServer

    (tmp_path / "server").mkdir()
    server = MlflowServer(tmp_path / "server")
    env = {**os.environ, "MLFLOW_TRACKING_URI": server.url, "TF_CPP_MIN_LOG_LEVEL": "3",
           "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}  # fmt: skip
    args = [*TINY, "--target", "2", "--storage", str(tmp_path / "journal.log"), "--campaign", "away",
            "--max-epochs", "400", "--min-epochs", "400", "--max-train-images", "256"]  # fmt: skip
    process = subprocess.Popen([sys.executable, "-m", "nws.cli", "sample", *args], env=env, cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        lines, arrived = lines_of(process)
        wait_for_line(lines, arrived, process, "net 1/2 epoch 2/")
        server.stop()
        wait_for_line(lines, arrived, process, "nws sample: error")
        server.start()
        process.wait(timeout=300)
        assert process.returncode not in (0, None), "".join(lines)[-3000:]

        client = MlflowClient(server.url)
        nets = net_runs(client, "away")
        assert len(nets) == 1, [(r.info.run_name, r.info.status) for r in nets]
        assert nets[0].info.status in ("FAILED", "RUNNING"), (nets[0].info.status, "".join(lines)[-3000:])
        every_run = client.search_runs([nets[0].info.experiment_id])
        assert not [r.info.run_name for r in every_run if r.info.status == "FINISHED"]
    finally:
        if process.poll() is None:
            process.kill()
        server.stop()


def test_cleanup_marks_failed_a_net_run_finished_without_snapshots(tmp_path):
    """Runs that earlier versions left FINISHED and empty are repaired by `cleanup`."""
    from mlflow import MlflowClient

    from nws.tracking.tags import TAG_CAMPAIGN, TAG_FAILURE, TAG_ROLE, TAG_SNAPSHOTS

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("nws")
    runs = {}
    for name, tags in {"empty": {}, "complete": {TAG_SNAPSHOTS: "complete"}}.items():
        tags = {TAG_ROLE: "net", TAG_CAMPAIGN: "old", **tags}
        run = client.create_run(experiment, run_name=name, tags=tags)
        client.set_terminated(run.info.run_id, "FINISHED")
        runs[name] = run.info.run_id

    dry = nws("cleanup", "--campaign", "old", "--dry-run", "true", "--storage", str(tmp_path / "j.log"),
              tracking_uri=uri, cwd=tmp_path)  # fmt: skip
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert f"net run {runs['empty']}" in dry.stdout and "would be marked FAILED" in dry.stdout, dry.stdout
    assert client.get_run(runs["empty"]).info.status == "FINISHED"

    journal = str(tmp_path / "j.log")
    done = nws("cleanup", "--campaign", "old", "--storage", journal, tracking_uri=uri, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "1 FINISHED without complete snapshots marked FAILED" in done.stdout, done.stdout
    empty, complete = client.get_run(runs["empty"]), client.get_run(runs["complete"])
    assert empty.info.status == "FAILED" and "without complete snapshots" in empty.data.tags[TAG_FAILURE]
    assert complete.info.status == "FINISHED" and TAG_FAILURE not in complete.data.tags


def test_workers_end_with_their_parent_killed_by_sigkill(tmp_path):
    """SIGKILL of the parent of `--workers`: its workers used to train on alone under a campaign
    run that the next resume closed. Now each gets SIGTERM (Linux parent-death signal) and stops
    as on any stop: its net's run KILLED, nothing left RUNNING."""
    from mlflow import MlflowClient

    from tests.processes import alive, descendants

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "TF_CPP_MIN_LOG_LEVEL": "3"}
    args = [*TINY, "--workers", "2", "--target", "4", "--storage", str(tmp_path / "journal.log"),
            "--campaign", "orphaned", "--max-epochs", "400", "--min-epochs", "400",
            "--max-train-images", "256"]  # fmt: skip
    parent = subprocess.Popen([sys.executable, "-m", "nws.cli", "sample", *args], env=env, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    lines, arrived = lines_of(parent)
    workers: set[int] = set()
    try:
        wait_for_line(lines, arrived, parent, " epoch 2/")
        workers = descendants(parent.pid)
        assert workers, "".join(lines)[-3000:]
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 120
        while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
            arrived.wait(1)
            arrived.clear()
        left = [pid for pid in workers if alive(pid)]
        assert not left, "workers outlived their parent:\n" + "".join(lines)[-3000:]
    finally:
        parent.kill()
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
    nets = net_runs(MlflowClient(uri), "orphaned")
    statuses = [(r.info.run_name, r.info.status) for r in nets]
    assert nets and {status for _, status in statuses} == {"KILLED"}, statuses


@needs_root
@pytest.mark.parametrize("what", ["database", "artifacts"])
def test_a_tracking_store_that_fills_its_disk_is_one_line_and_the_resume_ends_at_the_target(what, tmp_path):
    """MLflow's SQLite database, or its artifact store (./mlruns of the working directory), on a
    filesystem that fills mid-campaign: one line naming it (no tracebacks from MLflow or Optuna
    before it; the traceback in the file the line names); once space is freed, the same campaign
    ends at its target with every net complete. The disk is filled after the first net."""
    from mlflow import MlflowClient

    from nws.tracking.tags import TAG_SNAPSHOTS

    with small_filesystem(tmp_path / "full", "64m") as full:
        uri = f"sqlite:///{(full if what == 'database' else tmp_path) / 'mlflow.db'}"
        cwd = tmp_path if what == "database" else full
        journal = tmp_path / "journal.log"
        args = ["--storage", str(journal), "--campaign", f"{what}-full", "--max-epochs", "3",
                "--min-epochs", "3"]  # fmt: skip
        process = start("sample", *args, "--target", "200", tracking_uri=uri, cwd=cwd)
        filler = fill_after_the_first_net(process, full, journal, f"{what}-full")
        first = ended(process)
        assert first.returncode == 1, first.stderr[-3000:]
        errors = [line for line in first.stderr.splitlines() if "error" in line.lower()]
        assert len(errors) == 1 and "no space left on device while writing" in errors[0], first.stderr[-3000:]
        assert str(full) in errors[0], errors
        assert "Traceback" not in first.stderr, first.stderr[-3000:]
        log = Path(errors[0].rsplit("traceback in ", 1)[1].rstrip(")"))
        assert "Traceback" in log.read_text()

        filler.unlink()
        client = MlflowClient(uri)
        done = len(net_runs(client, f"{what}-full", "FINISHED"))
        second = nws("sample", *args, "--target", str(done + 2), tracking_uri=uri, cwd=cwd)
        assert second.returncode == 0, second.stderr[-3000:]
        finished = net_runs(client, f"{what}-full", "FINISHED")
        assert len(finished) == done + 2
        assert all(r.data.tags.get(TAG_SNAPSHOTS) == "complete" for r in finished)
        assert not net_runs(client, f"{what}-full", "RUNNING")
