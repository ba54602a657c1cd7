"""The processes that make runs and trials, named `host:pid` (the `nws.worker` tag of a run, the
`worker` attribute of an Optuna trial), and what can be told of one from here: alive or gone on
this host; of another host nothing.

A process killed outright (SIGKILL, the out-of-memory killer, a lost node) leaves its runs and
trials RUNNING; these names are how they are found and closed (`nws.campaign.orphans`).
"""

from __future__ import annotations

import os
import socket

ALIVE = "alive"
GONE = "gone"
OTHER_HOST = "other host"
UNKNOWN = "unknown worker"


def worker_name(pid: int | None = None) -> str:
    """host:pid, how trials and runs name the process that made them."""
    return f"{socket.gethostname()}:{pid or os.getpid()}"


def process_is_gone(pid: int) -> bool:
    """Whether no process of this machine has this pid."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def worker_state(worker: str) -> str:
    """What can be said of a host:pid worker from here: ALIVE or GONE on this host, else
    OTHER_HOST, or UNKNOWN when there is no such name."""
    host, _, pid = worker.rpartition(":")
    if not host or not pid.isdigit():
        return UNKNOWN
    if host != socket.gethostname():
        return OTHER_HOST
    return GONE if process_is_gone(int(pid)) else ALIVE


def worker_of_this_host(worker: str, pids: list[int]) -> bool:
    """Whether `worker` names one of these processes of this host."""
    host, _, pid = worker.rpartition(":")
    return host == socket.gethostname() and pid.isdigit() and int(pid) in pids
