"""Stopping a real `nws sample` process mid-net and reading what it left behind: what the
interrupt tests and `benchmarks/interrupt_stress.py` do to it."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

NETS = ["--subset", "fixed", "--datasets", "digits", "--prints", "3", "--max-epochs", "8",
        "--min-epochs", "8", "--max-train-images", "256", "--max-eval-images", "64", "--threads", "1",
        "--n-nets", "2"]  # fmt: skip
"""Small nets of several epochs: a net takes a few seconds, most of it in Keras' fit."""
SIGNALS = {"INT": signal.SIGINT, "TERM": signal.SIGTERM}


@dataclass
class Sample:
    """A `nws sample` process with its output read by a thread (so the pipe never fills)."""

    process: subprocess.Popen
    campaign: str
    lines: queue.Queue = field(default_factory=queue.Queue)
    output: list[str] = field(default_factory=list)
    reader: threading.Thread | None = None

    def wait_for(self, text: str, timeout: float) -> bool:
        """Until a line of output contains `text` (False: the process ended or time ran out)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.process.poll() is not None and self.lines.empty():
                    return False
                continue
            if line is None:
                return False
            if text in line:
                return True
        return False

    def finish(self, timeout: float) -> tuple[int | None, str]:
        """The exit code (None: still running after `timeout`, then killed) and the output."""
        try:
            code: int | None = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            code = None
        if self.reader is not None:
            self.reader.join(timeout=10)
        return code, "".join(self.output)


def tracking_store(root: Path) -> str:
    """A SQLite tracking store with its tables made: processes that start together on a new one
    would each try to make them."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{root / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()
    return uri


def start_sample(
    campaign: str, tracking_uri: str, storage: str, cwd: Path, *args: str, nets: list[str] = NETS
) -> Sample:
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "TF_CPP_MIN_LOG_LEVEL": "3"}
    command = [sys.executable, "-m", "nws.cli", "sample", *nets, "--campaign", campaign, "--storage", storage]
    process = subprocess.Popen([*command, *args], env=env, cwd=cwd, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)  # fmt: skip
    sample = Sample(process, campaign)

    def read() -> None:
        for line in process.stdout:
            sample.output.append(line)
            sample.lines.put(line)
        sample.lines.put(None)

    sample.reader = threading.Thread(target=read, daemon=True)
    sample.reader.start()
    return sample


def interrupt_mid_net(sample: Sample, number: int, delay: float, after: str = "net 1/") -> bool:
    """Send signal `number` `delay` seconds after the first net started (the line `after`);
    False if the process never got there."""
    if not sample.wait_for(after, 240):
        return False
    time.sleep(delay)
    if sample.process.poll() is not None:
        return False
    sample.process.send_signal(number)
    return True


def unended(tracking_uri: str, storage: str, campaign: str) -> list[str]:
    """What a stopped campaign left running: its MLflow runs (nets and campaign runs) that did
    not end, or that ended otherwise than KILLED or FINISHED, and its RUNNING Optuna trials."""
    import optuna
    from mlflow import MlflowClient

    from nws.campaign.storage import open_storage

    client = MlflowClient(tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, f"tags.`nws.campaign` = '{campaign}'", max_results=1000)
    left = [
        f"{r.data.tags.get('nws.role')} run {r.info.run_id} {r.info.status}"
        for r in runs
        if r.info.status not in ("KILLED", "FINISHED")
    ]
    try:
        study = optuna.load_study(study_name=campaign, storage=open_storage(storage))
    except KeyError:  # stopped before its study was made
        return left
    return left + [
        f"trial {t.number} {t.state.name}"
        for t in study.get_trials(deepcopy=False)
        if t.state.name == "RUNNING"
    ]


def run_statuses(tracking_uri: str, campaign: str) -> dict[str, list[str]]:
    """The statuses of a campaign's runs by role ("net", "campaign")."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    found: dict[str, list[str]] = {}
    for run in client.search_runs(experiments, f"tags.`nws.campaign` = '{campaign}'", max_results=1000):
        found.setdefault(run.data.tags.get("nws.role", ""), []).append(run.info.status)
    return found
