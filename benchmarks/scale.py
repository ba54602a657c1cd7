"""Scale-out: nets per hour with 1 and 2 workers, and the coordination overhead per trial on
real servers against the same campaign on local storage, measured side by side in one run.

Setups (each a fresh campaign of the same small nets, `sample --workers W --target N`):
  local-1, local-2   Optuna journal file + MLflow SQLite file store (one machine)
  server-1, server-2 Optuna on PostgreSQL + `mlflow server` on PostgreSQL with proxied artifacts
  slurm-1, slurm-2   the same servers, the workers an array of 1 or 2 one-CPU tasks of
                     examples/cluster/sample.sbatch on a private single-node Slurm cluster
                     (tests/slurm.py; Debian's slurmctld, slurmd, munge), each task its own
                     `mlflow run` process; wall time from sbatch to an empty queue

Per setup it prints the wall time of the whole call (process start-up included), nets per hour
over that wall time and over the steady part (first trial start to last trial end), and per
trial the time that is not training: the trial's wall time in Optuna minus the net's
`train_seconds` (data loading, run creation, params, artifacts, ask/tell) plus the gap before the
worker's next trial (target bookkeeping). PostgreSQL comes from the Debian package (as in the
tests).

Run: python benchmarks/scale.py [--nets 8] [--epochs 2] [--setups local-1,local-2,server-1,server-2]
     python benchmarks/scale.py --setups slurm-1,slurm-2   (as root, or with Slurm installed)
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))


def sample(workers: int, nets: int, epochs: int, storage: str, tracking: str, cwd: Path) -> float:
    args = [sys.executable, "-m", "nws.cli", "sample", "--subset", "fixed", "--datasets", "digits",
            "--prints", "5", "--max-epochs", str(epochs), "--min-epochs", str(epochs),
            "--max-train-images", "500", "--max-eval-images", "200", "--campaign", "bench",
            "--workers", str(workers), "--target", str(nets), "--storage", storage]  # fmt: skip
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking, "TF_CPP_MIN_LOG_LEVEL": "3"}
    started = time.perf_counter()
    done = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"sample failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return wall


def slurm_array(slurm, tasks: int, nets: int, epochs: int, storage: str, tracking: str, cwd: Path) -> float:
    """The recipe as an array of `tasks` one-CPU tasks: seconds from sbatch to an empty queue."""
    small = f"prints=5 max_epochs={epochs} min_epochs={epochs} max_train_images=500 max_eval_images=200"
    slurm.env = {**slurm.env, "MLFLOW_TRACKING_URI": tracking, "NWS_STORAGE": storage,
                 "NWS_CAMPAIGN": "bench", "NWS_TARGET": str(nets), "NWS_SUBSET": "fixed",
                 "NWS_DATASETS": "digits", "NWS_DATA_DIR": str(cwd / "data"), "NWS_DOWNLOAD": "false",
                 "NWS_VENV": sys.prefix, "NWS_SAMPLE_PARAMS": small, "TF_CPP_MIN_LOG_LEVEL": "3"}  # fmt: skip
    recipe = ROOT / "examples" / "cluster" / "sample.sbatch"
    started = time.perf_counter()
    slurm.run("sbatch", "--parsable", f"--array=0-{tasks - 1}", "--cpus-per-task=1", "--mem=2G",
              f"--output={cwd}/task-%A_%a.log", str(recipe))  # fmt: skip
    while slurm.run("squeue", "-h", "-o", "%i").stdout.strip():
        time.sleep(0.5)
    wall = time.perf_counter() - started
    import optuna

    from nws.campaign.storage import open_storage

    study = optuna.load_study(study_name="bench", storage=open_storage(storage))
    if sum(t.state.name == "COMPLETE" for t in study.get_trials(deepcopy=False)) != nets:
        logs = "".join(log.read_text()[-1500:] for log in cwd.glob("task-*.log"))
        sys.exit(f"the array missed its target:\n{logs}")
    return wall


def trial_figures(storage: str, tracking: str) -> tuple[float, list[float]]:
    """The steady span (first start to last end) and each trial's time outside training."""
    import optuna
    from mlflow import MlflowClient

    from nws.campaign.storage import open_storage

    study = optuna.load_study(study_name="bench", storage=open_storage(storage))
    trials = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    client = MlflowClient(tracking)
    overheads = []
    by_worker: dict[str, list] = {}
    for t in trials:
        by_worker.setdefault(t.user_attrs["worker"], []).append(t)
    for worker_trials in by_worker.values():
        worker_trials.sort(key=lambda t: t.datetime_start)
        for i, t in enumerate(worker_trials):
            seconds = client.get_run(t.user_attrs["mlflow_run_id"]).data.metrics["train_seconds"]
            outside = (t.datetime_complete - t.datetime_start).total_seconds() - seconds
            if i + 1 < len(worker_trials):  # the worker's bookkeeping before its next trial
                outside += (worker_trials[i + 1].datetime_start - t.datetime_complete).total_seconds()
            overheads.append(outside)
    span = (max(t.datetime_complete for t in trials) - min(t.datetime_start for t in trials)).total_seconds()
    return span, overheads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--setups", default="local-1,local-2,server-1,server-2")
    a = parser.parse_args()
    setups = [s.strip() for s in a.setups.split(",")]

    root = Path(tempfile.mkdtemp(prefix="nws-scale-"))
    postgres = server = slurm = None
    if any(not s.startswith("local") for s in setups):
        from tests.conftest import MlflowServer, Postgres

        postgres = Postgres(Path(tempfile.mkdtemp(prefix="nws-postgres-")))
    if any(s.startswith("slurm") for s in setups):
        from tests.slurm import Slurm

        slurm = Slurm(Path(tempfile.mkdtemp(prefix="nws-slurm-")))
    print(f"{a.nets} nets per setup (fixed subset, digits, 500 train images, {a.epochs} epochs), "
          f"{os.cpu_count()} CPU cores")  # fmt: skip
    print(f"{'setup':<10} {'wall s':>8} {'nets/h wall':>12} {'nets/h steady':>14} "
          f"{'outside training s/trial (median, mean)':>42}")  # fmt: skip
    try:
        for setup in setups:
            kind, workers = setup.split("-")
            work = root / setup
            work.mkdir()
            if kind == "local":
                storage, tracking = str(work / "journal.log"), f"sqlite:///{work / 'mlflow.db'}"
            else:
                storage = postgres.database(f"optuna_{kind}_{workers}")
                server = MlflowServer(work, backend=postgres.database(f"mlflow_{kind}_{workers}"))
                tracking = server.url
            if kind == "slurm":
                wall = slurm_array(slurm, int(workers), a.nets, a.epochs, storage, tracking, work)
            else:
                wall = sample(int(workers), a.nets, a.epochs, storage, tracking, work)
            span, overheads = trial_figures(storage, tracking)
            if server is not None:
                server.stop()
                server = None
            print(f"{setup:<10} {wall:>8.1f} {a.nets / wall * 3600:>12.0f} {a.nets / span * 3600:>14.0f} "
                  f"{statistics.median(overheads):>30.2f}, {statistics.mean(overheads):.2f}")  # fmt: skip
    finally:
        if slurm is not None:
            slurm.stop()
            shutil.rmtree(slurm.root, ignore_errors=True)
        if server is not None:
            server.stop()
        if postgres is not None:
            postgres.stop()
            shutil.rmtree(postgres.root, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
