"""Where a study lives, and the Optuna storage there: a results file's journal file beside it,
an SQLite file, a database URL (PostgreSQL across machines), or this process's memory."""
import logging
import os
import sqlite3

import optuna
import sqlalchemy

log = logging.getLogger("autoresearch.storage")

_SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")
_SQLITE_HEADER = b"SQLite format 3\x00"


MEMORY = ":memory:"  # a study that lives in this process only (a dry run, a replay)


def study_location(results_path, storage=None):
    """Where the study of a results file lives: `storage` when given (a URL or a path), else the
    journal file beside it (results.tsv -> results.journal). A results directory from before
    the journal, whose runs are in an SQLite results.db (`--workers`), goes on in that file."""
    if storage:
        return storage
    path = os.path.abspath(results_path)
    journal = os.path.splitext(path)[0] + ".journal"
    legacy = os.path.join(os.path.dirname(path), "results.db")
    if not os.path.exists(journal) and os.path.exists(legacy):
        return "sqlite:///" + legacy
    return journal


def is_journal(location):
    """A plain path names Optuna's journal file, unless it is (or is named as) SQLite; this is
    also how optuna-dashboard reads a path."""
    if "://" in location or location == MEMORY:
        return False
    if location.endswith(_SQLITE_SUFFIXES):
        return False
    try:
        with open(location, "rb") as f:
            return f.read(len(_SQLITE_HEADER)) != _SQLITE_HEADER
    except FileNotFoundError:
        return True


def normalize_url(url):
    """A journal file as its absolute path; an SQLite path as its URL; postgresql:// for the
    psycopg (v3) driver we ship."""
    if url == MEMORY:
        return url
    if "://" not in url:
        return os.path.abspath(url) if is_journal(url) else "sqlite:///" + os.path.abspath(url)
    u = sqlalchemy.engine.make_url(url)
    if u.drivername in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+psycopg")
    return u.render_as_string(hide_password=False)


def engine_kwargs(url, retry_seconds):
    """SQLAlchemy's engine settings for a database URL, given the outage budget."""
    u = sqlalchemy.engine.make_url(url)
    if u.get_backend_name() == "sqlite":
        # Many processes write one file: wait for the lock (sqlite's busy timeout, 5 s by
        # default) up to the outage budget rather than fail at once; readers go on while one
        # writes (WAL, set on the file below).
        # Optuna retries a failed trial creation 5 times itself, hence a fifth of the budget.
        return {"connect_args": {"timeout": max(1, min(20, retry_seconds / 5))}}
    # A worker holds at most two connections (its loop and its heartbeat). pre_ping replaces a
    # pooled connection that died with a restarted server instead of failing the next query.
    return {"pool_pre_ping": True, "pool_size": 2, "max_overflow": 2}


def journal_storage(path):
    """Optuna's journal storage on a file: one JSON line per change, appended under a lock file
    (O_EXCL, which network and FUSE filesystems honour where fcntl and SQLite's WAL do not) and
    fsynced. A line torn by a crash mid-write (power, not kill -9: a write() completes) is cut
    off first, under the lock, or every later line would be unreadable."""
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock, JournalStorage
    os.makedirs(os.path.dirname(path), exist_ok=True)
    lock = JournalFileOpenLock(path, grace_period=10)  # a holder killed mid-write frees it in 10 s
    if os.path.exists(path) and os.path.getsize(path):
        lock.acquire()
        try:
            with open(path, "rb+") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.seek(0)
                    data = f.read()
                    f.truncate(data.rfind(b"\n") + 1)
                    log.warning("%s ended in a torn line (a crash while writing); cut it off",
                                path)
        finally:
            lock.release()
    return JournalStorage(JournalFileBackend(path, lock_obj=lock))


def open_storage(location):
    """The Optuna storage at a study location (study_location), to read it (the dashboard, a
    report): a journal file, an SQLite file or a database URL."""
    url = normalize_url(location)
    if "://" not in url:
        return journal_storage(url)
    prepare_sqlite(url)
    return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs(url, 120))


def prepare_sqlite(url):
    """Create an SQLite file's directory and put the file in WAL mode; other URLs as they are."""
    u = sqlalchemy.engine.make_url(url)
    if u.get_backend_name() != "sqlite" or not u.database or u.database == ":memory:":
        return
    os.makedirs(os.path.dirname(os.path.abspath(u.database)), exist_ok=True)
    # journal_mode=WAL is stored in the file, so setting it once serves every later connection.
    with sqlite3.connect(u.database, timeout=60) as con:
        con.execute("PRAGMA journal_mode=WAL")
