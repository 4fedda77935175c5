"""One study shared by many workers, on one machine or many, kept in Optuna's RDB storage.

SQLite (a file beside results.tsv) on one machine, PostgreSQL across machines. Optuna gives
what a shared record needs: trial numbers unique within a study (the study row is locked while
a number is counted), trials whose worker stopped beating failed by whoever looks next, and a
schema that optuna-dashboard reads. This module adds what the loop needs on top:

- a trial carries a *job* (what the worker is about to run: config, params, seed, worker ...)
  as its user attribute `job`, written in the same transaction that creates the trial;
- the finished results row is one user attribute `row`, so it is never half written;
- a trial whose worker died (kill -9, lost machine) reads back as a crash row, error `lost`;
- a database that goes away is retried with backoff for `retry_seconds`, then StorageError.

    shared = SharedStudy("sqlite:///results.db", "autoresearch")
    number = shared.reserve({"config": "3f2a1c", "seed": 43, "worker": "gpubox/cuda:1", ...})
    ...run the trial...
    shared.finish(number, row, value=row["val_bpb"])   # value None: a crash
    sync_results_tsv(shared, "results.tsv")
"""
import copy
import datetime
import json
import logging
import math
import os
import socket
import sqlite3
import threading
import time
import uuid
import warnings

import optuna
import sqlalchemy
import sqlalchemy.exc
import tenacity
from optuna.exceptions import StorageInternalError, UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from autoresearch import history, ledger
from autoresearch.ledger import StorageError

log = logging.getLogger("autoresearch.storage")

COLUMNS = ledger.COLUMNS
# What this module adds to a job (in its `job` attribute).
_RESERVED = ("reservation", "deadline", "owner")


def _is_outage(exc):
    """A lost or refused connection, a server restart, or SQLite's 'database is locked': worth
    retrying. Bad data (a value too long, a constraint) is not."""
    if isinstance(exc, StorageInternalError) and exc.__cause__ is not None:
        exc = exc.__cause__
    if isinstance(exc, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError,
                        sqlalchemy.exc.DisconnectionError)):
        return True
    return isinstance(exc, sqlalchemy.exc.DBAPIError) and exc.connection_invalidated


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


def _engine_kwargs(url, retry_seconds):
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


def _journal(path):
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
        return _journal(url)
    _prepare_sqlite(url)
    return optuna.storages.RDBStorage(url, engine_kwargs=_engine_kwargs(url, 120))


def _prepare_sqlite(url):
    u = sqlalchemy.engine.make_url(url)
    if u.get_backend_name() != "sqlite" or not u.database or u.database == ":memory:":
        return
    os.makedirs(os.path.dirname(os.path.abspath(u.database)), exist_ok=True)
    # journal_mode=WAL is stored in the file, so setting it once serves every later connection.
    with sqlite3.connect(u.database, timeout=60) as con:
        con.execute("PRAGMA journal_mode=WAL")


class SharedStudy:
    """One Optuna study shared by workers; see the module docstring.

    heartbeat_seconds: how often a worker records that its trials are alive.
    grace: seconds without a heartbeat after which any worker fails the trial (it becomes a
        crash row `lost`). Keep it several heartbeats long: a busy database delays beats.
    retry_seconds: how long a database outage is retried before StorageError.
    """

    def __init__(self, url, study_name="autoresearch", *, heartbeat_seconds=10, grace=60,
                 retry_seconds=120):
        if heartbeat_seconds < 1 or grace <= heartbeat_seconds:
            raise ValueError("need heartbeat_seconds >= 1 and grace > heartbeat_seconds")
        self.url = normalize_url(url)
        self.study_name = study_name
        self.heartbeat_seconds = int(heartbeat_seconds)
        self.grace = int(grace)
        self.retry_seconds = retry_seconds
        self._held = {}               # trial_id -> number, the trials this process runs
        self._numbers = {}            # number -> trial_id
        self._sources = {}
        self._rows = {}               # number -> (trial_id, row): the finished rows seen so far
        self._built, self._late = set(), set()
        self._lines = {}              # trial_id -> its row as a results.tsv line
        self._views = set()           # results files checked to be views of this study
        self._last_sweep = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._beater = None
        # Workers that open a new database together race to create Optuna's tables (SQLite:
        # "table already exists", PostgreSQL: a duplicate type): the loser's next try finds them.
        self._call("opening the study", self._open, retry_if=lambda e: _is_outage(e) or isinstance(
            e, (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError)))

    def _open(self):
        if "://" not in self.url:
            self.rdb = None
            self.storage = (optuna.storages.InMemoryStorage() if self.url == MEMORY
                            else _journal(self.url))
            self._open_study()
            return
        _prepare_sqlite(self.url)
        with warnings.catch_warnings():  # heartbeats: "experimental" since Optuna 2.9
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            rdb = optuna.storages.RDBStorage(
                self.url, engine_kwargs=_engine_kwargs(self.url, self.retry_seconds),
                heartbeat_interval=self.heartbeat_seconds, grace_period=self.grace)
        self.rdb = rdb
        # The cached storage reads only trials that are new or were unfinished at the last
        # read, so rows() costs what changed, not the size of the study.
        self.storage = optuna.storages.get_storage(rdb)
        self._open_study()

    def _open_study(self):
        self.study = optuna.create_study(storage=self.storage, study_name=self.study_name,
                                         direction="minimize", load_if_exists=True)
        self.study_id = self.storage.get_study_id_from_name(self.study_name)

    # -- retries --------------------------------------------------------------------------

    def _call(self, what, fn, *args, retry_if=_is_outage, **kwargs):
        start = time.monotonic()
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(retry_if),
            # jitter: workers cut off together must not all come back in the same instant
            wait=tenacity.wait_exponential(multiplier=0.2, max=5) + tenacity.wait_random(0, 0.2),
            stop=tenacity.stop_after_delay(self.retry_seconds),
            before_sleep=lambda rs: log.warning(
                "database busy or unreachable while %s (try %d): %s; retrying", what,
                rs.attempt_number, rs.outcome.exception()))
        try:
            for attempt in retrying:
                with attempt:
                    return fn(*args, **kwargs)
        except tenacity.RetryError as e:
            exc = e.last_attempt.exception()
            cause = exc.__cause__ if isinstance(exc, StorageInternalError) else exc
            cause = getattr(cause, "orig", None) or cause  # the driver's own words
            raise StorageError(f"database unreachable for {time.monotonic() - start:.0f} s "
                               f"while {what}: {cause}") from exc

    # -- reserving and finishing trials ---------------------------------------------------

    def reserve(self, job, *, unique=("config",), timeout=None, distributions=None):
        """Create a RUNNING trial carrying `job` (a JSON-able dict) and return its number, unique
        in the study. With `unique` (job keys), return None instead when another RUNNING trial
        holds the same values of those keys, so two workers never run one config at once.
        `timeout`: seconds after which any worker may fail the trial even if its heartbeat goes
        on (a hung trainer), and which also covers a kill between creation and first beat.
        `distributions` ({name: optuna distribution}): also record job["params"] as the trial's
        Optuna params, so optuna-dashboard plots them and Optuna samplers can read the study
        (the distributions of one name must stay compatible across the study)."""
        bad = set(job) & set(_RESERVED)
        if bad:
            raise ValueError(f"job keys reserved by the storage: {', '.join(sorted(bad))}")
        self._sweep()
        key = tuple(job.get(k) for k in unique) if unique else None
        if key is not None and any(self._key(j, unique) == key for j in self.running()):
            return None  # the common case, caught before a trial is spent on it
        token = uuid.uuid4().hex
        # One attribute, not one per key: the study stays locked while a trial is created, and
        # each attribute is two more statements inside that lock (3x slower at 8 keys).
        attrs = {"job": _plain(job, "job") | {"reservation": token, "owner": _owner()}}
        if timeout is not None:
            attrs["job"]["deadline"] = time.time() + timeout
        distributions = {k: d for k, d in (distributions or {}).items()
                         if k in job.get("params", {})}
        params = {k: job["params"][k] for k in distributions}
        tries = []

        def create():
            if tries:  # an earlier try may have committed before its connection dropped
                mine = self._find(lambda a: a.get("job", {}).get("reservation") == token)
                if mine is not None:
                    return mine._trial_id
            tries.append(1)
            return self.storage.create_new_trial(self.study_id, template_trial=FrozenTrial(
                number=-1, state=TrialState.RUNNING, value=None,
                datetime_start=datetime.datetime.now(), datetime_complete=None, params=params,
                distributions=distributions, user_attrs=attrs, system_attrs={},
                intermediate_values={}, trial_id=-1))

        trial_id = self._call("reserving a trial", create)
        self._call("recording a heartbeat", self._heartbeat, trial_id)
        number = self._call("reading the new trial", self.storage.get_trial, trial_id).number
        with self._lock:
            self._held[trial_id] = number
            self._numbers[number] = trial_id
        self._start_heartbeat()
        if key is None:
            return number
        # Lowest number wins. Numbers are counted under the study's row lock, so a trial with a
        # lower number was committed before ours was created and this read sees it (unless it
        # already finished); the one with the lowest number never withdraws.
        first = min((j["number"] for j in self.running() if self._key(j, unique) == key),
                    default=number)
        if first == number:
            return number
        self._call("withdrawing a duplicate", self._withdraw, trial_id, first)
        return None

    @staticmethod
    def _key(job, unique):
        return tuple(job.get(k) for k in unique)

    def _withdraw(self, trial_id, winner):
        self.storage.set_trial_user_attr(trial_id, "withdrawn", winner)
        try:
            self.storage.set_trial_state_values(trial_id, TrialState.FAIL)
        except UpdateFinishedTrialError:
            pass
        self._release(trial_id)

    def _find(self, match, states=(TrialState.RUNNING,)):
        for t in self.storage.get_all_trials(self.study_id, deepcopy=False, states=states):
            if match(t.user_attrs):
                return t
        return None

    def _trial_id(self, number):
        with self._lock:
            if number in self._numbers:
                return self._numbers[number]
        return self._call("looking up a trial",
                          self.storage.get_trial_id_from_study_id_trial_number, self.study_id,
                          number)

    def frozen(self, number):
        """Trial `number` as the storage holds it now (a FrozenTrial)."""
        return self._call("reading a trial", self.storage.get_trial, self._trial_id(number))

    def report(self, number, step, value):
        """An intermediate value of a running trial of this process (a point of its curve). A
        failure is logged, not raised: a lost point must never stop a run."""
        try:
            self.storage.set_trial_intermediate_value(self._trial_id(number), step, float(value))
        except Exception as e:  # noqa: BLE001 - an outage, or a trial failed meanwhile
            log.warning("could not report trial %d's curve at %s: %s", number, step, e)

    def finish(self, number, row, value, details=None):
        """Record the results row of trial `number` and close it: COMPLETE with `value`, PRUNED
        for a run stopped early (row status pruned; its value the last point of its curve, as
        Optuna's own tell() does, so optuna-dashboard draws that curve), or FAIL when value is None or not finite
        (a crash). `details` ({name: JSON-able}) become
        user attributes beside the row. Safe to call again after an error.
        If another worker already failed the trial as lost (this worker was cut off from the
        database past the grace), the row is kept in a new trial that replaces it."""
        row = _plain(row, "row") | {"trial": row.get("trial", number)}
        ok = value is not None and math.isfinite(value)
        state = TrialState.COMPLETE if ok else \
            TrialState.PRUNED if row.get("status") == "pruned" else TrialState.FAIL
        values = [float(value)] if ok else None
        trial_id = self._trial_id(number)
        if state == TrialState.PRUNED:  # as Optuna's tell(): the last point of its curve
            points = self._call("reading a trial", self.storage.get_trial,
                                trial_id).intermediate_values
            values = [points[max(points)]] if points else None

        details = _plain(details or {}, "details")

        def close():
            try:
                for key, text in details.items():
                    self.storage.set_trial_user_attr(trial_id, key, text)
                self.storage.set_trial_user_attr(trial_id, "row", row)
                self.storage.set_trial_state_values(trial_id, state, values)
                return number
            except UpdateFinishedTrialError:
                pass
            trial = self.storage.get_trial(trial_id)
            if trial.state == state and trial.user_attrs.get("row") == row:
                return number  # an earlier try committed; its answer was lost
            late = self._find(lambda a: a.get("late_for") == number, states=None)
            if late is not None:
                return late.number
            log.warning("trial %d was failed as lost while it ran (this worker was cut off for "
                        "more than %d s); its row goes into a new trial", number, self.grace)
            attrs = {"job": trial.user_attrs.get("job", {})}
            now = datetime.datetime.now()
            new_id = self.storage.create_new_trial(self.study_id, template_trial=FrozenTrial(
                number=-1, state=state, value=values[0] if values else None,
                datetime_start=trial.datetime_start, datetime_complete=now, params=trial.params,
                distributions=trial.distributions,
                user_attrs=attrs | details | {"row": row, "late_for": number}, system_attrs={},
                intermediate_values=trial.intermediate_values, trial_id=-1))
            return self.storage.get_trial(new_id).number

        try:
            return self._call(f"finishing trial {number}", close)
        finally:
            self._release(trial_id)

    def _release(self, trial_id):
        with self._lock:
            self._held.pop(trial_id, None)

    # -- what the study holds -------------------------------------------------------------

    def running(self):
        """The jobs of the trials still RUNNING, every worker's, each with its `number`."""
        self._sweep()
        trials = self._call("reading running trials", self.storage.get_all_trials,
                            self.study_id, deepcopy=False, states=(TrialState.RUNNING,))
        return [self._job(t) | {"number": t.number} for t in trials
                if "job" in t.user_attrs]

    @staticmethod
    def _job(trial):
        return {k: copy.deepcopy(v) for k, v in trial.user_attrs.get("job", {}).items()
                if k not in _RESERVED}

    def rows(self):
        """Every finished row of the study in trial order (copies). A trial whose worker
        vanished reads as a crash row with error `lost`, filled from its job."""
        # rows hold scalars and flat dicts (params, changes): two levels is a full copy
        return [{k: v.copy() if isinstance(v, (dict, list)) else v for k, v in row.items()}
                for _, row in self._view()]

    def _view(self):
        """(trial id, row) of the finished rows in trial order, shared with the cache:
        read-only. The trial id is that of the trial the row came from. Finished trials
        never change in Optuna, so each is turned into a row once per process, and a call
        costs what finished since the last one."""
        self._sweep()
        trials = self._call("reading the study", self.storage.get_all_trials, self.study_id,
                            deepcopy=False)
        # what sync_results_tsv needs to tell a row newer than this read from a foreign one
        self.numbers_seen = {t.number for t in trials}
        self.numbers_running = {t.number for t in trials if not t.state.is_finished()}
        for t in trials:  # by number: a late trial comes after the one it replaces
            a = t.user_attrs
            if (not t.state.is_finished() or t._trial_id in self._built
                    or "job" not in a and "late_for" not in a or "withdrawn" in a):
                continue
            self._built.add(t._trial_id)
            if "late_for" in a:
                self._late.add(a["late_for"])
                self._rows[a["late_for"]] = (t._trial_id, a["row"])
            elif t.number not in self._late:
                self._rows[t.number] = (t._trial_id, a["row"] if "row" in a
                                        else self._lost_row(t))
        return [self._rows[n] for n in sorted(self._rows)]

    def _lost_row(self, trial):
        job = self._job(trial)
        row = {c: job[c] for c in COLUMNS if c in job}
        config = row.get("config")
        runs = sum(1 for n, (_, r) in self._rows.items() if n < trial.number and config
                   and r.get("config") == config and r.get("status") != "crash")
        return row | {"trial": trial.number, "status": "crash", "error": "lost", "val_bpb": 0.0,
                      "memory_gb": 0.0, "mean_bpb": 0.0, "runs": runs}

    def has_trials(self):
        return bool(self._call("reading the study", self.storage.get_all_trials,
                               self.study_id, deepcopy=False))

    def claim(self):
        """What the study was claimed for ({profile, data, time_budget}), or None."""
        return self._call("reading the study", self.storage.get_study_user_attrs,
                          self.study_id).get("claim")

    def set_claim(self, claim):
        self._call("claiming the study", self.storage.set_study_user_attr, self.study_id,
                   "claim", _plain(claim, "claim"))

    def import_rows(self, rows, curves=None):
        """Seed an empty study with the rows of an existing results.tsv under their own trial
        numbers; numbers missing from the file are taken by withdrawn placeholders, so new
        trials never reuse one. `curves` ({trial: {step: value}}) become the trials'
        intermediate values. Run it from one process, before any other writes. Returns how
        many rows were imported."""
        curves = curves or {}
        if self._call("reading the study", self.storage.get_all_trials, self.study_id,
                      deepcopy=False):
            raise StorageError(f"study {self.study_name!r} is not empty; import only into a "
                               "new study")
        try:
            rows = sorted(rows, key=lambda r: int(r["trial"]))
        except (KeyError, TypeError, ValueError):
            raise StorageError("every imported row needs an integer `trial`") from None
        numbers = [int(r["trial"]) for r in rows]
        if len(set(numbers)) != len(numbers) or numbers and numbers[0] < 0:
            raise StorageError("imported rows repeat a trial number or have a negative one")
        at = 0
        for row in rows:
            while at <= int(row["trial"]):
                gap = at < int(row["trial"])
                value = _float(row.get("val_bpb"))
                ok = not gap and row.get("status") in history.FINISHED and value is not None
                attrs = ({"withdrawn": "gap in the imported results"} if gap
                         else {"row": dict(row)})
                now = datetime.datetime.now()
                self._call("importing rows", self.storage.create_new_trial, self.study_id,
                           template_trial=FrozenTrial(
                               number=-1, state=TrialState.COMPLETE if ok
                               else TrialState.PRUNED if row.get("status") == "pruned"
                               else TrialState.FAIL,
                               value=value if ok else None, datetime_start=now,
                               datetime_complete=now, params={}, distributions={},
                               user_attrs=attrs | {"job": {"reservation": "imported"}},
                               system_attrs={},
                               intermediate_values={} if gap else curves.get(at, {}),
                               trial_id=-1))
                at += 1
        return len(rows)

    # -- code mode: train.py sources ------------------------------------------------------

    def put_source(self, key, text):
        """Share an edited train.py under `key` (say, its hash). Writing a key again is allowed
        only with the same text."""
        old = self.get_source(key)
        if old is not None and old != text:
            raise StorageError(f"source {key!r} is already stored with other text")
        if old is None:
            self._call("storing a source", self.storage.set_study_system_attr, self.study_id,
                       f"source:{key}", text)
        self._sources[key] = text

    def get_source(self, key):
        """The text stored under `key`, or None. Sources never change, so each is read once."""
        if key not in self._sources:
            attrs = self._call("reading sources", self.storage.get_study_system_attrs,
                               self.study_id)
            self._sources.update({k[7:]: v for k, v in attrs.items() if k.startswith("source:")})
        return self._sources.get(key)

    # -- results.tsv as the view ----------------------------------------------------------

    def write_view(self, path):
        """Write `path` as a view of the whole study: every finished row of every worker, in trial
        order, replaced in one rename so pandas never reads a half-written file. A file holding
        rows that the study does not (another study, or runs before it) is refused, not
        overwritten. Returns the rows written (read-only)."""
        path = os.path.abspath(path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        view = self._view()
        # Workers of one machine sync the same file one at a time. Another may have written rows
        # that finished after our read: keep its lines, so the view never goes back, rather than
        # read the study again while every other worker waits for the lock.
        with ledger.directory_lock(os.path.dirname(path)):
            header, old = _lines_in(path)
            lines, newer = self._lines_of(view, old)
            last = max(self.numbers_seen, default=-1)
            known = path in self._views  # written or checked by this process before
            if not known and any(int(t) > last for t in newer if t.isdigit()):
                # Trials beyond what we have read, in a file we do not know: read again, so a
                # results file of another run is not taken for a newer view of this study.
                view = self._view()
                lines, newer = self._lines_of(view, old)
                last = max(self.numbers_seen, default=-1)
            foreign = [t for t in newer if not t.isdigit() or int(t) > last and not known
                       or int(t) <= last and int(t) not in self.numbers_running]
            if foreign or newer and header != COLUMNS:
                raise StorageError(
                    f"{path} holds trial(s) {', '.join((foreign or list(newer))[:5])} that study "
                    f"{self.study_name!r} does not; import them first (SharedStudy.import_rows) "
                    f"or use another results file")
            self._views.add(path)
            if header == COLUMNS and old.keys() == lines.keys():
                return [row for _, row in view]  # another worker already wrote this view
            merged = lines | newer
            text = "\t".join(COLUMNS) + "\n" + "".join(merged[t] for t in sorted(merged, key=int))
            ledger.write_atomic(path, text)
        return [row for _, row in view]

    def _lines_of(self, view, old):
        """Our rows as lines by trial number, and the file's lines of trials we have no row for."""
        lines = {}
        for trial_id, row in view:
            if trial_id not in self._lines:
                unknown = set(row) - set(COLUMNS) - set(ledger.STUDY_FIELDS)
                if unknown:
                    raise StorageError(f"trial {row['trial']}'s row carries unknown results "
                                       f"column(s): {', '.join(sorted(unknown))}")
                self._lines[trial_id] = ledger.format_row(row)
            lines[str(row["trial"])] = self._lines[trial_id]
        return lines, {t: line for t, line in old.items() if t not in lines}

    # -- liveness ---------------------------------------------------------------------------

    def _sweep(self):
        """Fail the trials of workers that stopped beating (Optuna's own check, run here because
        Optuna runs it only inside Study.optimize) and those past their deadline. It reads
        every running trial, so with N workers sweeping the cost grows as N^2: each worker
        sweeps at most every half grace, and a lost trial is still failed within 1.5 graces."""
        now = time.monotonic()
        if now - self._last_sweep < self.grace / 2:
            return
        self._last_sweep = now
        with self._lock:
            held = list(self._held)
        for trial_id in held:  # our own trials are alive, whatever the beat thread managed
            self._call("recording a heartbeat", self._heartbeat, trial_id)
        if self.rdb is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                self._call("failing stale trials", optuna.storages.fail_stale_trials, self.study)
        for t in self._call("reading running trials", self.storage.get_all_trials,
                            self.study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            if t._trial_id in held:
                continue
            deadline = t.user_attrs.get("job", {}).get("deadline")
            if (deadline is not None and time.time() > deadline + self.grace
                    or self.rdb is None and self._silent(t) or _owner_gone(t)):
                try:
                    self._call("failing a lost trial",
                               self.storage.set_trial_state_values, t._trial_id, TrialState.FAIL)
                except UpdateFinishedTrialError:
                    pass

    def _heartbeat(self, trial_id):
        """Say that a trial of this process is alive: Optuna's heartbeat on an RDB storage; on
        the journal, which has none, the time in a system attribute."""
        if self.rdb is not None:
            self.storage.record_heartbeat(trial_id)
        else:
            self.storage.set_trial_system_attr(trial_id, "heartbeat", time.time())

    def _silent(self, trial):
        """A journal trial whose last beat (or start) is older than the grace."""
        beat = trial.system_attrs.get("heartbeat")
        if beat is None and trial.datetime_start is not None:
            beat = trial.datetime_start.timestamp()
        return beat is not None and time.time() - beat > self.grace

    def _start_heartbeat(self):
        with self._lock:
            if self._beater is not None and self._beater.is_alive():
                return
            self._beater = threading.Thread(target=self._beat, name="storage-heartbeat",
                                            daemon=True)
            self._beater.start()

    def _beat(self):
        # One thread beats for every trial this process holds. A failed beat is only logged: the
        # next one retries, and an outage longer than the grace is what finish() recovers from.
        while not self._stop.wait(self.heartbeat_seconds):
            with self._lock:
                held = list(self._held)
            for trial_id in held:
                try:
                    self._heartbeat(trial_id)
                except Exception as e:  # noqa: BLE001 - a beat must never kill the worker
                    log.warning("heartbeat of trial %s failed: %s", trial_id, e)

    def close(self):
        self._stop.set()
        if self._beater is not None:
            self._beater.join(timeout=self.heartbeat_seconds + 5)
        if self.rdb is not None:
            self.rdb.engine.dispose()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


_owners = {}


def _owner():
    """This process as a trial's owner: a restarted loop on the same machine then fails at once
    the trials of a process that is gone (kill -9), rather than after the heartbeat's grace.
    (Per pid: a forked process is another owner.)"""
    pid = os.getpid()
    if pid not in _owners:
        import psutil
        _owners[pid] = {"host": socket.gethostname(), "pid": pid,
                        "since": psutil.Process(pid).create_time()}
    return _owners[pid]


def _owner_gone(trial):
    owner, me = trial.user_attrs.get("job", {}).get("owner"), _owner()
    if not isinstance(owner, dict) or owner.get("host") != me["host"] \
            or owner.get("pid") == me["pid"]:
        return False
    import psutil
    try:  # a pid reused by a newer process is not the owner either
        return abs(psutil.Process(owner["pid"]).create_time() - owner["since"]) > 1
    except psutil.NoSuchProcess:
        return True
    except (psutil.AccessDenied, KeyError, TypeError, ValueError):
        return False


def _plain(value, what):
    """A copy as the database will give it back (JSON), so a retry can compare what it wrote."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as e:
        raise ValueError(f"the {what} must be JSON-able: {e}") from None


def _float(text):
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _lines_in(path):
    """A results file's header and its whole rows by trial number, whatever its columns."""
    try:
        with open(path, newline="") as f:
            lines = f.read().splitlines(keepends=True)
    except FileNotFoundError:
        return COLUMNS, {}
    if not lines:
        return COLUMNS, {}
    header = lines[0].rstrip("\n").split("\t")
    if "trial" not in header:
        raise StorageError(f"{path} does not have the results.tsv columns; is it ours?")
    at = header.index("trial")
    return header, {line.split("\t")[at]: line for line in lines[1:]
                    if line.endswith("\n") and line.count("\t") == len(header) - 1}


def sync_results_tsv(shared, path):
    """Write `path` as the view of `shared` (SharedStudy.write_view); returns its rows."""
    return shared.write_view(path)
