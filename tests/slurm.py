"""A private single-node Slurm cluster for the tests: munge, slurmctld and slurmd from Debian's
packages, started as the current user in a temporary directory with their own ports, socket and
state, and shut down afterwards. Nothing of the machine's own Slurm (if any) is used."""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import free_port

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
PROGRAMS = ["slurmctld", "slurmd", "sbatch", "squeue", "scancel", "sinfo", "scontrol", "munged"]


def _installed() -> bool:
    return all(shutil.which(p) or Path("/usr/sbin", p).exists() for p in PROGRAMS)


def install_slurm() -> None:
    """Debian's Slurm and munge, when the tests run as root on a machine without them (a fresh
    machine running the README's test command); otherwise a clear failure, never a skip."""
    if _installed():
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.fail(f"Slurm is needed: install the Debian packages {' '.join(PACKAGES)} (.ci/run does)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"],
                    ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]):  # fmt: skip
        subprocess.run(command, check=True, capture_output=True, env=env)


def _program(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 1024


class Slurm:
    """The cluster: `env` is what Slurm's commands need (`SLURM_CONF`); `run` calls one of them."""

    def __init__(self, root: Path, cpus: int = 4) -> None:
        """`cpus`: what the node offers, more than a 2-core machine has, so that three one-CPU
        tasks run at once."""
        install_slurm()
        self.root = root
        munge = root / "munge"
        munge.mkdir(mode=0o700)
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.socket = munge / "munge.socket"
        subprocess.run(
            [_program("munged"), "--force", f"--socket={self.socket}", f"--key-file={key}",
             f"--log-file={munge / 'munged.log'}", f"--pid-file={munge / 'munged.pid'}",
             f"--seed-file={munge / 'munged.seed'}"],
            check=True, capture_output=True,
        )  # fmt: skip
        host, user = socket.gethostname(), getpass.getuser()
        for part in ("state", "spool"):
            (root / part).mkdir()
        conf = root / "slurm.conf"
        conf.write_text(
            f"ClusterName=nwstest\nSlurmctldHost={host}(127.0.0.1)\n"
            f"AuthType=auth/munge\nAuthInfo=socket={self.socket}\nCredType=cred/munge\n"
            f"SlurmUser={user}\nSlurmdUser={user}\n"
            f"SlurmctldPort={free_port()}\nSlurmdPort={free_port()}\n"
            f"StateSaveLocation={root / 'state'}\nSlurmdSpoolDir={root / 'spool'}\n"
            f"SlurmctldPidFile={root / 'slurmctld.pid'}\nSlurmdPidFile={root / 'slurmd.pid'}\n"
            f"SlurmctldLogFile={root / 'slurmctld.log'}\nSlurmdLogFile={root / 'slurmd.log'}\n"
            "ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\nJobAcctGatherType=jobacct_gather/none\n"
            "SchedulerType=sched/backfill\nSelectType=select/cons_tres\nSelectTypeParameters=CR_Core_Memory\n"
            "ReturnToService=2\nMpiDefault=none\nKillWait=10\nInactiveLimit=0\nMinJobAge=3600\n"
            "SlurmdParameters=config_overrides\n"  # the node may say more CPUs than the machine has
            f"NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={_memory_mb()} State=UNKNOWN\n"
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP\n"
        )
        self.env = {**os.environ, "SLURM_CONF": str(conf)}
        self.daemons = [
            subprocess.Popen([_program(name), "-D", *extra], env=self.env, cwd=root,
                             stdout=open(root / f"{name}.out", "w"), stderr=subprocess.STDOUT)  # noqa: SIM115
            for name, extra in (("slurmctld", ["-i"]), ("slurmd", []))
        ]  # fmt: skip
        deadline = time.monotonic() + 120
        while self.run("sinfo", "-h", "-o", "%t", check=False).stdout.strip() != "idle":
            if time.monotonic() > deadline or any(d.poll() is not None for d in self.daemons):
                logs = "".join(p.read_text()[-1500:] for p in root.glob("slurm*.log"))
                self.stop()
                pytest.fail(f"the private Slurm cluster did not come up:\n{logs}")
            time.sleep(0.5)

    def run(self, *command: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(list(command), env=self.env, capture_output=True, text=True, check=check)

    def stop(self) -> None:
        """Cancel what is left, wait for its processes to end (slurmd ends them), then the daemons."""
        self.run("scancel", "--user", getpass.getuser(), check=False)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and self.run("squeue", "-h", check=False).stdout.strip():
            time.sleep(1)
        for daemon in self.daemons:
            daemon.terminate()
        for daemon in self.daemons:
            try:
                daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        subprocess.run([_program("munged"), f"--socket={self.socket}", "--stop"], capture_output=True)
