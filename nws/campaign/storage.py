"""Where a campaign lives in Optuna: its storage (an RDB URL, or a journal file for processes on
one machine) and its study, created on the first call and continued by every later one.

The storage must never be MLflow's own tracking database: both keep an `alembic_version` table,
so Optuna would write its tables into MLflow's. That is refused however the URL is spelled.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from nws import interrupts, space
from nws.backend import TENSORFLOW
from nws.campaign.settings import CampaignSettings
from nws.campaign.trials import fail_and_retry
from nws.checks import writable_directory
from nws.errors import ParameterError

DEFAULT_STORAGE = "optuna-journal.log"
STUDY_ATTRS = ("subset", "datasets", "fidelity", "backend")
"""Study user attributes that fix a campaign's space; a continuation must match them."""
TAIL_CHUNK = 1 << 16
JOURNAL_RECORD_START = b'{"op_code":'
"""How Optuna writes each journal record (compact JSON, its operation first)."""
SERVER_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433, "oracle": 1521}
"""Default ports, so that a URL with the port and one without name the same server."""


def open_storage(url: str, heartbeat: int | None = None) -> Any:
    """An Optuna storage from a URL: RDB URLs (sqlite:///, postgresql://, ...) as RDBStorage,
    `journal:<path>` or a path as a JournalStorage file (several processes on one machine).

    With `heartbeat`, an RDB storage records a heartbeat per running trial; a trial silent for
    twice that long is failed, its MLflow run marked FAILED, and Optuna retries its configuration.
    """
    import optuna
    from optuna.storages.journal import JournalStorage

    url = check_storage(url)
    if "://" in url:
        connect = {"connect_timeout": 5} if url.startswith("postgresql") else {}
        try:
            with warnings.catch_warnings():  # heartbeats are marked experimental in Optuna
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url,
                    engine_kwargs={"connect_args": connect, "pool_pre_ping": True},
                    heartbeat_interval=heartbeat,
                    grace_period=2 * heartbeat if heartbeat else None,
                    heartbeat_stale_trial_callback=fail_and_retry if heartbeat else None,
                )
        except Exception as e:  # SQLAlchemy raises many types for bad URLs or servers
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ParameterError("storage", f"cannot open {url}: {reason}") from None
    return JournalStorage(_journal_file(str(_journal_path(url))))


def _journal_file(path: str) -> Any:
    """Optuna's journal file, each write whole with respect to a stop signal.

    Optuna takes the journal's lock (a symbolic link) around each write. A KeyboardInterrupt
    landing inside that, on the way in or out, makes Optuna remove a lock it does not hold
    (another process's) or raise FileNotFoundError in place of the interrupt (the process then
    ends with exit 1, not 130; seen with two processes stopped at once). The stop is only recorded
    during the write: raised at its end, it would land in Optuna's handling of a trial's end,
    which it breaks (UnboundLocalError); the campaign's next `interrupts.check()` raises it."""
    from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock

    class WholeWrites(JournalFileBackend):
        def append_logs(self, logs: list[dict[str, Any]]) -> None:
            with interrupts.held():
                with _locked(self._lock):
                    cut_torn_tail(Path(path))
                super().append_logs(logs)

    if os.path.exists(path):
        with interrupts.held(), _locked(JournalFileSymlinkLock(path)):
            heal_journal(Path(path))
    return WholeWrites(path)


@contextmanager
def _locked(lock: Any) -> Iterator[None]:
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


def cut_torn_tail(path: Path) -> int:
    """Cut a torn last record (a write that stopped halfway: a full disk, a kill) off the journal,
    so that the next record starts on a line of its own; the bytes cut (0: none). Optuna reads
    past a torn last line but appends to it, which glues the next record onto it for good.
    Called under the journal's lock."""
    with open(path, "rb+") as f:
        end = f.seek(0, os.SEEK_END)
        if end == 0:
            return 0
        f.seek(end - 1)
        if f.read(1) == b"\n":
            return 0
        start = max(0, end - TAIL_CHUNK)
        while True:  # the last newline, read backwards in chunks
            f.seek(start)
            chunk = f.read(end - start)
            newline = chunk.rfind(b"\n")
            if newline >= 0 or start == 0:
                keep = start + newline + 1 if newline >= 0 else 0
                break
            start = max(0, start - TAIL_CHUNK)
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    _say(path, f"cut a torn last record ({end - keep} bytes) left by a write that stopped halfway")
    return end - keep


def heal_journal(path: Path) -> tuple[int, int]:
    """Make a journal readable again before use (under its lock, in place): cut a torn last
    record (`cut_torn_tail`), and split records that an earlier version glued onto a torn one
    (the torn part dropped, the whole record after it kept). A file that is not an Optuna journal
    is refused in one line and left as it is. Returns (bytes cut at the tail, records split)."""
    data = path.read_bytes()
    lines = data.split(b"\n")
    tail = lines.pop()  # after the last newline: empty, or a torn record
    healed, split = [], 0
    for number, line in enumerate(lines, 1):
        record = line if _is_record(line) else _last_whole_record(line)
        if record is None or not line.startswith(JOURNAL_RECORD_START):
            raise ParameterError(
                "storage", f"{path} is not an Optuna journal (line {number} is no record of one)"
            )
        healed.append(record)
        split += record is not line
    if tail and not (JOURNAL_RECORD_START.startswith(tail[:11]) or tail.startswith(JOURNAL_RECORD_START)):
        raise ParameterError(
            "storage", f"{path} is not an Optuna journal (its last line is no record of one)"
        )
    cut = cut_torn_tail(path) if tail else 0
    if split:
        with open(path, "rb+") as f:
            f.write(b"".join(record + b"\n" for record in healed))
            f.truncate()
            f.flush()
            os.fsync(f.fileno())
        _say(path, f"dropped the torn start of {split} record(s) that a later write was glued onto")
    return cut, split


def _is_record(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def _last_whole_record(line: bytes) -> bytes | None:
    """The whole journal record at the end of a line that starts with a torn one, or None."""
    start = line.find(JOURNAL_RECORD_START, 1)
    while start > 0:
        try:
            json.loads(line[start:])
            return line[start:]
        except ValueError:
            start = line.find(JOURNAL_RECORD_START, start + 1)
    return None


def _say(path: Path, what: str) -> None:
    print(f"nws: journal {path}: {what}", file=sys.stderr, flush=True)


def check_storage(url: str) -> str:
    """The storage URL (the default if empty), refused with one line when Optuna could not or
    must not write there: MLflow's own tracking database, however it is spelled (relative, with
    `..`, through a link, MLflow's default `mlflow.db`), or a journal file that cannot be
    written."""
    import mlflow

    url = url.strip() or DEFAULT_STORAGE
    tracking = mlflow.get_tracking_uri()
    if "://" in url:
        same = _same_database(url, tracking)
    else:
        mlflow_file = _sqlite_file(tracking)
        same = mlflow_file is not None and _same_file(_journal_path(url), mlflow_file)
    if same:
        raise ParameterError(
            "storage",
            f"{url} is MLflow's tracking database ({tracking}); give Optuna a storage of its own "
            "(both keep an alembic_version table)",
        )
    return url


def _journal_path(url: str) -> Path:
    """A journal file's path, checked: its directory exists and can be written, and it is a
    file that can be written if it exists."""
    path = Path(url.removeprefix("journal:")).expanduser()
    if path.is_dir():
        raise ParameterError("storage", f"{path} is a directory, not a journal file")
    if not os.path.lexists(path.parent):
        raise ParameterError("storage", f"directory {path.parent} does not exist")
    writable_directory("storage", path.parent)
    if path.exists() and not os.access(path, os.W_OK):
        raise ParameterError("storage", f"{path} is not writable")
    return path


def _sqlite_file(url: str) -> Path | None:
    """The database file of a SQLite URL; None for anything else (a server, memory, a file store)."""
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:  # not a SQLAlchemy URL: an http(s) tracking server, a file store, ...
        return None
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database.removeprefix("file:")).expanduser()


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file: the same inode when both exist (links, hard links),
    else the same path once links and `..` are resolved."""
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return os.path.realpath(a) == os.path.realpath(b)


def _same_database(url: str, other: str) -> bool:
    """Whether two SQLAlchemy URLs name one database: one SQLite file, or one database of one
    server (user, password, driver and options aside)."""
    from sqlalchemy.engine import make_url

    files = _sqlite_file(url), _sqlite_file(other)
    if files[0] is not None and files[1] is not None:
        return _same_file(*files)
    try:
        a, b = make_url(url), make_url(other)
    except Exception:
        return False
    backend = a.get_backend_name()
    if backend == "sqlite" or backend != b.get_backend_name():
        return False
    return ((a.host or "").lower(), a.port or SERVER_PORTS.get(backend), a.database) == (
        (b.host or "").lower(),
        b.port or SERVER_PORTS.get(backend),
        b.database,
    )


def open_study(settings: CampaignSettings) -> Any:
    """Create or continue the campaign's study; refuse a continuation with another space."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(settings.storage, settings.heartbeat)
    study = optuna.create_study(
        study_name=settings.name,
        storage=storage,
        direction="maximize",
        sampler=space.TrialSeededSampler(settings.seed),
        load_if_exists=True,
    )
    wanted = {"subset": settings.subset, "datasets": ",".join(settings.datasets), "seed": settings.seed,
              "fidelity": settings.train.fidelity, "backend": settings.backend}  # fmt: skip
    existing = study.user_attrs
    if study.get_trials(deepcopy=False):  # begun before the option: its nets trained clean, on TF
        existing = {"fidelity": "clean", "backend": TENSORFLOW, **existing}
    for key, value in wanted.items():
        # Key by key: workers starting together may see the study before its creator has set
        # every attribute; the first to find one missing sets it.
        if key not in existing:
            study.set_user_attr(key, value)
        elif key in STUDY_ATTRS and existing[key] != value:
            raise ParameterError(
                key,
                f"campaign {settings.name!r} was started with {key}={existing[key]}; "
                f"got {value} (use another campaign name)",
            )
    return study


def load_study(name: str, url: str) -> Any:
    """The study `name` in the storage, or None where the storage holds none (a journal file that
    does not exist is not created)."""
    import optuna

    url = url.strip() or DEFAULT_STORAGE
    if "://" not in url and not Path(url.removeprefix("journal:")).expanduser().is_file():
        return None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.load_study(study_name=name, storage=open_storage(url))
    except KeyError:
        return None
