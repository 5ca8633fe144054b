"""Where a study lives: Optuna storages chosen, opened and kept alive for the sweep.

- ``sqlite:///PATH`` (default, one worker), ``postgresql://USER@HOST/DB`` (many workers on many machines; MySQL
  URLs work too): RDB storages with trial heartbeats, so a dead worker's trial goes stale, is failed and rerun.
  Workers started together on an empty database wait for each other while Optuna creates its tables.
  Every call is retried for a while when the database connection drops (a server restart), so workers carry on.
- ``journal:PATH``: Optuna's journal file backend, safe for several local processes without a server; the default
  for ``--workers N`` when no server is given (SQLite is not safe for parallel writers). Trials record heartbeats
  in the journal too (:class:`HeartbeatJournalStorage`), and a record left half-written by a killed writer is cut
  off when the journal is next opened.
"""

from __future__ import annotations

import functools
import logging
import random
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import optuna
import sqlalchemy.exc
from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages.journal import JournalFileBackend
from optuna.storages.journal._file import get_lock_file
from optuna.trial import TrialState

log = logging.getLogger(__name__)

RECONNECT_SECONDS = 120.0
"""How long a storage call keeps retrying while the database is unreachable."""

_CONNECTION_ERRORS = (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError,
                      optuna.exceptions.StorageInternalError)

_RETRIED = (
    "create_new_study", "get_all_studies", "get_study_id_from_name", "get_study_name_from_id", "get_study_directions",
    "get_study_user_attrs", "get_study_system_attrs", "set_study_user_attr", "set_study_system_attr",
    "create_new_trial", "_create_new_trial", "set_trial_param", "_set_trial_param", "set_trial_state_values",
    "set_trial_intermediate_value", "set_trial_user_attr", "set_trial_system_attr", "get_trial",
    "get_all_trials", "_get_trials", "get_trial_id_from_study_id_trial_number", "_get_best_trial_id",
    "record_heartbeat", "_get_stale_trial_ids",
)


LASTING_FAULTS = ("disk is full", "readonly database", "read-only", "not a database", "disk i/o error",
                  "no space left")
"""Storage errors that waiting does not cure (the disk, not the connection): raised at once, not retried."""


def is_lasting(err: BaseException | None) -> bool:
    """Whether ``err`` (or an error it was raised from) is a fault of the disk rather than of the connection (see
    :data:`LASTING_FAULTS`)."""
    if err is None:
        return False
    text = str(err).lower()
    return any(fault in text for fault in LASTING_FAULTS) or is_lasting(err.__cause__ or err.__context__)


def _with_reconnect(method: Callable) -> Callable:
    @functools.wraps(method)
    def call(self: RDBStorage, *args: Any, **kwargs: Any) -> Any:
        deadline = time.monotonic() + RECONNECT_SECONDS
        delay = 0.5
        while True:
            try:
                return method(self, *args, **kwargs)
            except _CONNECTION_ERRORS as err:
                if is_lasting(err) or time.monotonic() + delay > deadline:
                    raise
                log.warning("storage unreachable (%s); retrying in %.1f s", str(err).splitlines()[0][:120], delay)
                self.engine.dispose()  # drop the pool's dead connections
                time.sleep(delay)
                delay = min(2 * delay, 8.0)
    return call


class ReconnectingRDBStorage(RDBStorage):
    """``RDBStorage`` whose calls wait out a lost database connection (up to :data:`RECONNECT_SECONDS`)."""


for _name in _RETRIED:
    setattr(ReconnectingRDBStorage, _name, _with_reconnect(getattr(RDBStorage, _name)))


HEARTBEAT_ATTR = "heartbeat"
"""System attribute in which a journal trial records the time of its last heartbeat."""

STALE_RETRIES = 3
"""How often a trial whose worker died is rerun (Optuna's ``RetryHeartbeatStaleTrialCallback``)."""

SCHEMA_ATTEMPTS = 8
"""Times a worker opens an empty database again while other workers are creating Optuna's tables in it."""


class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """Optuna's journal storage with trial heartbeats, as its RDB storages have: a running trial writes the time
    into the journal every ``heartbeat_interval`` seconds, and one silent for ``grace_period`` (counted from its
    start when it has not beaten yet) is stale: failed and rerun. The clocks of the processes sharing the journal
    must agree (one machine, or one local file system: a journal file must not live on NFS anyway).

    Args:
        backend: the journal file.
        heartbeat_interval: seconds between heartbeats.
        grace_period: seconds of silence that make a trial stale.
    """

    def __init__(self, backend: JournalFileBackend, heartbeat_interval: int, grace_period: int) -> None:
        super().__init__(backend)
        self.heartbeat_interval = heartbeat_interval
        self.grace_period = grace_period
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self.stale_callback = RetryHeartbeatStaleTrialCallback(max_retry=STALE_RETRIES)

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            self.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # another worker found this trial stale (this process was stopped too long) and failed it

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        limit = time.time() - self.grace_period
        running = self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
        return [trial._trial_id for trial in running
                if max(trial.system_attrs.get(HEARTBEAT_ATTR, 0.0), trial.datetime_start.timestamp()) < limit]

    def get_heartbeat_interval(self) -> int:
        return self.heartbeat_interval

    def get_heartbeat_stale_trial_callback(self) -> Callable[[optuna.Study, optuna.trial.FrozenTrial], None]:
        return self.stale_callback


def journal_backend(path: Path) -> JournalFileBackend:
    """Optuna's journal file backend for ``path``, named by its absolute path.

    Its lock is a symbolic link ``PATH.lock`` pointing at the path as given, and a lock left by a killed writer is
    only broken once its target can be looked up from the link's folder: with a relative path it never can, and the
    next run waits forever (spinning a core). An absolute path lets the lock's 30 s grace period break it.
    """
    return JournalFileBackend(str(path.absolute()))


LOCK_GRACE_SECONDS = 30
"""Age after which a journal's lock is a killed writer's (Optuna's grace period; a writer holds it milliseconds)."""


def break_dangling_lock(path: Path) -> None:
    """Remove the journal's lock ``PATH.lock`` when it is a link whose target cannot be found (made with a relative
    path: Optuna's grace period can never break it) and older than :data:`LOCK_GRACE_SECONDS`.

    Args:
        path: the journal file.
    """
    lock = Path(f"{path.absolute()}.lock")
    try:
        if lock.is_symlink() and not lock.exists() and time.time() - lock.lstat().st_mtime > LOCK_GRACE_SECONDS:
            lock.unlink()
            log.warning("removed the lock %s a killed writer had left", lock)
    except FileNotFoundError:
        pass  # another process removed it meanwhile


def repair_journal(backend: JournalFileBackend, path: Path) -> None:
    """Cut off a last record left half-written by a writer killed mid-write (the file then does not end in a
    newline; appending after it would corrupt the next record too). Done under the journal's own lock, so a live
    writer is never cut.

    Args:
        backend: the journal's backend (its lock).
        path: the journal file.
    """
    break_dangling_lock(path)
    if not path.exists() or path.stat().st_size == 0:
        return
    with get_lock_file(backend._lock):
        with open(path, "rb+") as journal:
            content = journal.read()
            if content.endswith(b"\n"):
                return
            journal.truncate(content.rfind(b"\n") + 1)
    log.warning("journal %s ended in a half-written record (its writer was stopped mid-write); removed it", path)


def storage_file(url: str) -> Path | None:
    """The file a ``sqlite:///PATH`` or ``journal:PATH`` storage lives in; ``None`` for a database server."""
    if url.startswith(("sqlite:///", "journal:")):
        return Path(url.removeprefix("sqlite:///").removeprefix("journal:"))
    return None


def default_storage(folder: Path, workers: int) -> str:
    """The storage of a study folder when ``--storage`` is not given.

    A journal file once one exists or when several local workers share the study; SQLite otherwise.
    A study moving from SQLite to a journal file is copied over (see :func:`open_storage`).
    """
    journal = folder / "study.journal"
    return f"journal:{journal}" if journal.exists() or workers > 1 else f"sqlite:///{folder / 'study.db'}"


def open_storage(url: str, heartbeat: int) -> optuna.storages.BaseStorage:
    """An Optuna storage for ``url``.

    Args:
        url: ``sqlite:///PATH``, ``postgresql://...``, ``mysql://...`` or ``journal:PATH``.
        heartbeat: seconds between trial heartbeats; a trial silent for 3 is stale and rerun.

    Raises:
        ValueError: a malformed or unreachable URL, in one line.
    """
    path = storage_file(url)
    if path is not None and not path.parent.is_dir():
        raise ValueError(f"cannot open storage {url}: folder {path.parent} does not exist; make it or name a "
                         "file in an existing folder")
    if url.startswith("journal:"):
        if path.is_dir():
            raise ValueError(f"cannot open storage {url}: {path} is a folder; name a file in it")
        try:
            backend = journal_backend(path)
            repair_journal(backend, path)
            return HeartbeatJournalStorage(backend, heartbeat, 3 * heartbeat)
        except OSError as err:
            raise ValueError(f"cannot open storage {url}: cannot open {path} ({err.strerror}); name a file in a "
                             "writable folder") from None
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"cannot open storage {url}: not an Optuna journal file ({type(err).__name__}: "
                             f"{str(err)[:100]}); restore it or name another file") from None
    if not url.startswith(("sqlite:///", "postgresql://", "postgresql+", "mysql://", "mysql+")):
        raise ValueError(f"--storage {url!r} is not valid; use sqlite:///PATH, postgresql://USER@HOST/DB or "
                         "journal:PATH")
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    attempt = 1
    while True:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return ReconnectingRDBStorage(
                    url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat, grace_period=3 * heartbeat,
                    heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=STALE_RETRIES))
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as err:
            if attempt == SCHEMA_ATTEMPTS or not _concurrent_schema_creation(err):
                raise _storage_error(url, err) from None
            # another worker is creating Optuna's tables in this empty database at this moment: open it again
            time.sleep(random.uniform(0.05, 0.25) * attempt)
            attempt += 1
        except ImportError as err:  # Optuna's message names no module; the module it failed on does
            missing = getattr(err.__cause__, "name", None) or "its driver"
            example = "postgresql+psycopg2://" if url.startswith("postgresql") else "mysql+pymysql://"
            raise ValueError(f"cannot open storage {url}: the database driver {missing} is not installed; install it "
                             f"(pip) or name a driver you have in the URL, such as {example}") from None
        except Exception as err:  # noqa: BLE001  (drivers raise many kinds; the user needs one line)
            raise _storage_error(url, err) from None


def _concurrent_schema_creation(err: Exception) -> bool:
    """Whether ``err`` is another process creating the same tables at the same moment."""
    text = str(err).lower()
    return "already exists" in text or "duplicate key" in text or "uniqueviolation" in text


def _storage_error(url: str, err: Exception) -> ValueError:
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ValueError(f"cannot open storage {url}: {reason}")


def move_sqlite_study_to_journal(folder: Path, study_name: str) -> None:
    """Copy a study kept in ``folder/study.db`` into ``folder/study.journal`` (once) and set the SQLite file aside
    as ``study.db.moved``, so every later run finds the study in the journal.

    Args:
        folder: the study's results folder.
        study_name: the study to copy.
    """
    database, journal = folder / "study.db", folder / "study.journal"
    if journal.exists() or not database.exists():
        return
    source = f"sqlite:///{database}"
    if study_name in {s.study_name for s in optuna.get_all_study_summaries(source)}:
        target = JournalStorage(journal_backend(journal))
        optuna.copy_study(from_study_name=study_name, from_storage=source, to_storage=target)
        log.warning("moved study %r from %s to %s: SQLite is not safe for parallel writers; later runs use the "
                    "journal file", study_name, database, journal)
    database.rename(folder / "study.db.moved")
