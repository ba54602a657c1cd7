"""Shared fixtures: a temporary SQLite MLflow store per test, TensorFlow configured once; the
session zoos and servers, whose users are marked slow here."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

# A shell that starts the suite in the background (`python -m pytest &` in a script) hands it
# SIGINT ignored, and nws keeps an ignored SIGINT ignored, as `nohup` users expect: the tests of
# Ctrl-C would then fail for want of the signal. Handle it here and in the processes started.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# One thread count for this process and every process the tests start (`mlflow run`, `nws sample`):
# op determinism gives bit-identical snapshots only for the same thread count, and TensorFlow fixes
# a process's count when it starts, so tests that compare an in-process net with a subprocess's
# would otherwise depend on which campaign happened to start TensorFlow first. The count is
# `sample`'s default (`--threads 1`: one intra-op, one inter-op thread), so a subprocess started
# with the defaults makes the same nets as this process. Even a net's initial weights differ
# between 1 and 2 threads (measured), so no test may mix counts.
os.environ["TF_NUM_INTRAOP_THREADS"] = "1"
os.environ["TF_NUM_INTEROP_THREADS"] = "1"

ROOT = Path(__file__).resolve().parents[1]
NO_TENSORFLOW = """
import sys

class NoTensorFlow:  # a machine with JAX alone: TensorFlow cannot be imported
    def find_spec(self, name, path=None, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
            raise ImportError("no TensorFlow on this machine")

sys.meta_path.insert(0, NoTensorFlow())
"""
"""Python source that makes `import tensorflow` fail from then on in the process that runs it
(first lines of a `python -c` program, or a `sitecustomize`)."""
SLOW_FIXTURES = {"zoo", "meta_zoo", "mlflow_server", "postgres"}
"""Session fixtures that sample a zoo or start a server: a test that uses one, directly or through
another fixture, is marked `slow` (`python -m pytest -m "not slow"` runs the fast set)."""


GROUPS = {"zoo": "zoos", "meta_zoo": "zoos", "postgres": "servers", "mlflow_server": "servers"}
"""The process (pytest-xdist worker) that runs every test of a session fixture: a zoo or a server
is then built by one worker only. A test with a module's own fixture of module or session scope
goes where the rest of its module goes; the other tests go to whichever worker is free."""
SECOND_ZOO_LANE = frozenset({"tests.test_order", "tests.test_train_all", "tests.test_cnn_zoo"})
"""Modules whose zoo tests run in a second process with a `meta_zoo` of its own (bit-identical:
same seed, one thread). In one process, the zoo tests took 689 s of a 720 s suite (4 workers on
2 CPUs): the suite waited on that one process. Two lanes of about 510 s each, for the cost of a
second meta zoo (about 45 CPU-s)."""
WORKERS_PER_CPU = 2
"""Test processes per CPU for `-n logical` (at most `--maxprocesses`): many tests spend much
of their time waiting on the processes, servers and Slurm tasks they started. Measured on 2 CPUs
(vmstat, 2026-12-07): one process per CPU left them 31 % idle over the first 1,000 s; two per
CPU, 3-7 % idle, the whole suite in 12-13 min."""


@pytest.hookimpl(tryfirst=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None  # pytest-xdist's own: the user's count
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return WORKERS_PER_CPU * (cpus or 1)


def xdist_group(item: pytest.Item) -> str | None:
    fixtures = getattr(item, "_fixtureinfo", None)
    definitions = fixtures.name2fixturedefs if fixtures else {}
    for name, group in GROUPS.items():
        if name in definitions:
            return f"{group}-2" if group == "zoos" and item.module.__name__ in SECOND_ZOO_LANE else group
    shared = [name for name, defs in definitions.items()
              if defs and defs[-1].scope != "function" and defs[-1].baseid.endswith(".py")]  # fmt: skip
    return item.module.__name__ if shared else None


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own, which reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
        group = xdist_group(item)
        if group:
            item.add_marker(pytest.mark.xdist_group(group))


def pytest_collection_finish(session: pytest.Session) -> None:
    """In a pytest-xdist worker with `--dist loadgroup`: stop if the groups were lost (pytest
    9.2 with pytest-xdist 3.8, pytest-xdist#1386), rather than build every zoo in every worker."""
    if not getattr(session.config.option, "loadgroup", False):
        return
    lost = [i.nodeid for i in session.items if i.get_closest_marker("xdist_group") and "@" not in i.nodeid]
    if lost:
        raise pytest.UsageError(
            f"pytest-xdist ignores the test groups ({lost[0]} has none): install pytest<9.2 "
            "(pip install -e '.[dev]'), or run with -n 0"
        )


@pytest.fixture(scope="session", autouse=True)
def _tensorflow() -> None:
    from nws.backend import configure_tensorflow

    configure_tensorflow(deterministic=True, threads=1)


THREAD_VARIABLES = ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS")


@pytest.fixture(autouse=True)
def _thread_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """A campaign run in-process with `threads` sets TensorFlow's thread variables in this
    process's environment; they must not leak into later tests' subprocesses (see above)."""
    for name in THREAD_VARIABLES:
        if name in os.environ:
            monkeypatch.setenv(name, os.environ[name])
        else:
            monkeypatch.delenv(name, raising=False)


@pytest.fixture
def tracking_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh SQLite tracking store (and artifact root) for one test."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(uri)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


class Zoo:
    """A tiny campaign sampled once per session with the real `sample` entry point."""

    def __init__(self, root: Path, tracking_uri: str, storage: str, parameters: dict[str, str]):
        self.root = root
        self.tracking_uri = tracking_uri
        self.storage = storage
        self.parameters = parameters
        self.project_run_id = ""


ZOO_PARAMETERS = {
    "n_nets": "3",
    "subset": "main",
    "datasets": "digits,shapes",
    "prints": "4",
    "max_epochs": "2",
    "min_epochs": "1",
    "max_train_images": "150",
    "max_eval_images": "60",
    "seed": "1",
    "campaign": "e2e",
    "threads": "1",  # as this process (see above): test_sample replays a net here
}


@pytest.fixture(scope="session")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Zoo:
    import mlflow
    import mlflow.projects

    root = tmp_path_factory.mktemp("zoo")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    storage = str(root / "optuna.log")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.chdir(root)
        mlflow.set_tracking_uri(uri)
        submitted = mlflow.projects.run(
            str(ROOT),
            entry_point="sample",
            parameters={**ZOO_PARAMETERS, "storage": storage},
            env_manager="local",
            synchronous=True,
            experiment_name="nws",  # as the README's `mlflow run . --experiment-name nws`
        )
        mlflow.set_tracking_uri(None)
    made = Zoo(root, uri, storage, ZOO_PARAMETERS)
    made.project_run_id = submitted.run_id
    return made


@pytest.fixture
def in_zoo(zoo: Zoo, monkeypatch: pytest.MonkeyPatch) -> Zoo:
    """Point MLflow at the session's zoo for one test."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", zoo.tracking_uri)
    monkeypatch.chdir(zoo.root)
    mlflow.set_tracking_uri(zoo.tracking_uri)
    yield zoo
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """An `mlflow server` subprocess on 127.0.0.1 with proxied artifacts."""

    def __init__(self, root: Path, backend: str = "", port: int = 0) -> None:
        self.root = root
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.backend = backend or f"sqlite:///{root / 'server.db'}"
        self.start()

    def start(self) -> None:
        import subprocess
        import sys

        self.log = open(self.root / "server.log", "a")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", self.backend,
             "--artifacts-destination", str(self.root / "artifacts"), "--workers", "1"],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=self.root,
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},  # no job runner: faster start
        )  # fmt: skip
        self.wait_ready()

    def wait_ready(self, timeout: float = 90.0) -> None:
        import time
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.root / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("mlflow server did not start within 90 s")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except Exception:
            self.process.kill()
            self.process.wait()
        self.log.close()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory, postgres: Postgres) -> MlflowServer:
    """One tracking server for the session, as a cluster runs it: PostgreSQL backend store,
    proxied artifacts. Tests keep apart by campaign name."""
    server = MlflowServer(tmp_path_factory.mktemp("server"), backend=postgres.database("mlflow"))
    yield server
    server.stop()


META_ZOO = {
    "n_nets": 30,
    "subset": "fixed",
    "datasets": "digits,shapes",
    "prints": 3,
    "max_epochs": 0,
    "min_epochs": 0,
    "max_train_images": 64,
    "max_eval_images": 32,
    "seed": 2,
    "campaign": "meta",
}


@pytest.fixture(scope="session")
def meta_zoo(tmp_path_factory: pytest.TempPathFactory) -> Zoo:
    """Thirty nets of the fixed architecture at their initialisation (max_epochs=0): every
    property of the space is drawn, and the initialisation is plainly encoded in the weights."""
    import mlflow

    from nws.commands.sample import SampleOptions, run_campaign

    root = tmp_path_factory.mktemp("meta-zoo")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    storage = str(root / "optuna.log")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.chdir(root)
        mlflow.set_tracking_uri(uri)
        run_campaign(SampleOptions(**META_ZOO, storage=storage))
        mlflow.set_tracking_uri(None)
    return Zoo(root, uri, storage, {k: str(v) for k, v in META_ZOO.items()})


@pytest.fixture
def in_meta_zoo(meta_zoo: Zoo, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Zoo:
    """The meta zoo's store for one test, with a fresh snapshot cache and an empty registry."""
    import mlflow
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", meta_zoo.tracking_uri)
    monkeypatch.setenv("NWS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(meta_zoo.root)
    mlflow.set_tracking_uri(meta_zoo.tracking_uri)
    client = MlflowClient()
    for model in client.search_registered_models():
        client.delete_registered_model(model.name)
    yield meta_zoo
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


def install_postgres() -> list[str]:
    """The Debian package, when the tests run as root on a machine without it (a fresh machine
    running the README's test command); otherwise a clear failure."""
    import glob
    import shutil
    import subprocess

    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.fail("PostgreSQL is needed: install the Debian package postgresql (.ci/run does)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "postgresql"]
    for command in (["apt-get", "update", "-qq"], install):
        subprocess.run(command, check=True, capture_output=True, env=env)
    return sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))


class Postgres:
    """A private PostgreSQL server (the Debian package's binaries) on 127.0.0.1, in a temporary
    directory, with a trusted user `nws`; databases are made per test."""

    def __init__(self, root: Path) -> None:
        import glob
        import shutil
        import subprocess

        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl")) or install_postgres()
        self.bin = Path(found[-1]).parent
        self.root = root
        as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if as_postgres:
            shutil.chown(root, "postgres")
        self.as_postgres = as_postgres
        self.port = free_port()
        data = root / "data"
        subprocess.run([*as_postgres, str(self.bin / "initdb"), "-D", str(data), "-U", "nws", "--auth=trust",
                        "-E", "UTF8"], check=True, capture_output=True)  # fmt: skip
        options = f"-p {self.port} -k {root} -c listen_addresses=127.0.0.1 -c max_connections=300"
        subprocess.run([*as_postgres, str(self.bin / "pg_ctl"), "-D", str(data), "-l", str(root / "pg.log"),
                        "-w", "-o", options, "start"], check=True, capture_output=True)  # fmt: skip
        self.data = data
        self.count = 0

    def database(self, name: str = "") -> str:
        """A new empty database; its SQLAlchemy URL."""
        import psycopg

        self.count += 1
        name = name or f"db{self.count}"
        with psycopg.connect(host="127.0.0.1", port=self.port, user="nws", dbname="postgres",
                             autocommit=True) as connection:  # fmt: skip
            connection.execute(f"CREATE DATABASE {name}")
        return f"postgresql://nws@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        import subprocess

        pg_ctl = str(self.bin / "pg_ctl")
        stop = [*self.as_postgres, pg_ctl, "-D", str(self.data), "-m", "fast", "stop"]
        subprocess.run(stop, capture_output=True)


@pytest.fixture(scope="session")
def postgres() -> Postgres:
    import shutil
    import tempfile

    # Not under pytest's temporary root: that is private to this user, and the server runs as
    # `postgres` when the tests run as root.
    root = Path(tempfile.mkdtemp(prefix="nws-postgres-"))
    server = Postgres(root)
    yield server
    server.stop()
    shutil.rmtree(root, ignore_errors=True)
