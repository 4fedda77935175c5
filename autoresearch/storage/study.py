"""The shared study: one Optuna study that many workers reserve trials in, report curves to
and finish trials in, through calls retried across database outages (see the package's
docstring). Its trials' liveness is liveness.py's, results.tsv is view.py's, importing old rows
importing.py's."""
import copy
import datetime
import json
import logging
import math
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

from autoresearch.ledger import StorageError
from autoresearch.storage import importing
from autoresearch.storage.liveness import Liveness, lost_row, process_owner
from autoresearch.storage.location import (MEMORY, engine_kwargs, journal_storage,
                                           normalize_url, prepare_sqlite)
from autoresearch.storage.view import ResultsView

log = logging.getLogger("autoresearch.storage")

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


class SharedStudy:
    """One Optuna study shared by workers; see the package's docstring.

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
        self._numbers = {}            # number -> trial_id
        self._sources = {}
        self._rows = {}               # number -> (trial_id, row): the finished rows seen so far
        self._built, self._late = set(), set()
        self._lock = threading.Lock()
        self.liveness = Liveness(self, self.heartbeat_seconds, self.grace)
        self._results = ResultsView(self)
        # Workers that open a new database together race to create Optuna's tables (SQLite:
        # "table already exists", PostgreSQL: a duplicate type): the loser's next try finds them.
        self.call("opening the study", self._open, retry_if=lambda e: _is_outage(e) or isinstance(
            e, (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError)))

    def _open(self):
        if "://" not in self.url:
            self.rdb = None
            self.storage = (optuna.storages.InMemoryStorage() if self.url == MEMORY
                            else journal_storage(self.url))
            self._open_study()
            return
        prepare_sqlite(self.url)
        with warnings.catch_warnings():  # heartbeats: "experimental" since Optuna 2.9
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            rdb = optuna.storages.RDBStorage(
                self.url, engine_kwargs=engine_kwargs(self.url, self.retry_seconds),
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

    def call(self, what, fn, *args, retry_if=_is_outage, **kwargs):
        """fn(*args, **kwargs), retried while the database is out (retry_if) for up to
        retry_seconds; then StorageError, which says `what` was being done."""
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
        self.liveness.sweep()
        key = tuple(job.get(k) for k in unique) if unique else None
        if key is not None and any(self._key(j, unique) == key for j in self.running()):
            return None  # the common case, caught before a trial is spent on it
        token = uuid.uuid4().hex
        # One attribute, not one per key: the study stays locked while a trial is created, and
        # each attribute is two more statements inside that lock (3x slower at 8 keys).
        attrs = {"job": _plain(job, "job") | {"reservation": token, "owner": process_owner()}}
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

        trial_id = self.call("reserving a trial", create)
        self.call("recording a heartbeat", self.liveness.heartbeat, trial_id)
        number = self.call("reading the new trial", self.storage.get_trial, trial_id).number
        with self._lock:
            self._numbers[number] = trial_id
        self.liveness.hold(trial_id, number)
        if key is None:
            return number
        # Lowest number wins. Numbers are counted under the study's row lock, so a trial with a
        # lower number was committed before ours was created and this read sees it (unless it
        # already finished); the one with the lowest number never withdraws.
        first = min((j["number"] for j in self.running() if self._key(j, unique) == key),
                    default=number)
        if first == number:
            return number
        self.call("withdrawing a duplicate", self._withdraw, trial_id, first)
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
        self.liveness.release(trial_id)

    def _find(self, match, states=(TrialState.RUNNING,)):
        for t in self.storage.get_all_trials(self.study_id, deepcopy=False, states=states):
            if match(t.user_attrs):
                return t
        return None

    def _trial_id(self, number):
        with self._lock:
            if number in self._numbers:
                return self._numbers[number]
        return self.call("looking up a trial",
                         self.storage.get_trial_id_from_study_id_trial_number, self.study_id,
                         number)

    def frozen(self, number):
        """Trial `number` as the storage holds it now (a FrozenTrial)."""
        return self.call("reading a trial", self.storage.get_trial, self._trial_id(number))

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
            points = self.call("reading a trial", self.storage.get_trial,
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
            return self.call(f"finishing trial {number}", close)
        finally:
            self.liveness.release(trial_id)

    # -- what the study holds -------------------------------------------------------------

    def running(self):
        """The jobs of the trials still RUNNING, every worker's, each with its `number`."""
        self.liveness.sweep()
        trials = self.call("reading running trials", self.storage.get_all_trials,
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
                for _, row in self.finished()]

    def finished(self):
        """(trial id, row) of the finished rows in trial order, shared with the cache:
        read-only. The trial id is that of the trial the row came from. Finished trials
        never change in Optuna, so each is turned into a row once per process, and a call
        costs what finished since the last one."""
        self.liveness.sweep()
        trials = self.call("reading the study", self.storage.get_all_trials, self.study_id,
                           deepcopy=False)
        # what the results view needs to tell a row newer than this read from a foreign one
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
                                        else lost_row(t, self._job(t), self._rows))
        return [self._rows[n] for n in sorted(self._rows)]

    def optuna_study(self):
        """The optuna.Study itself, for Optuna's pruners and samplers to read."""
        return self.study

    def has_trials(self):
        return bool(self.call("reading the study", self.storage.get_all_trials,
                              self.study_id, deepcopy=False))

    def claim(self):
        """What the study was claimed for ({profile, data, time_budget}), or None."""
        return self.call("reading the study", self.storage.get_study_user_attrs,
                         self.study_id).get("claim")

    def set_claim(self, claim):
        self.call("claiming the study", self.storage.set_study_user_attr, self.study_id,
                  "claim", _plain(claim, "claim"))

    def import_rows(self, rows, curves=None):
        """Seed this empty study with the rows of an existing results.tsv; see
        importing.import_rows."""
        return importing.import_rows(self, rows, curves)

    # -- code mode: train.py sources ------------------------------------------------------

    def put_source(self, key, text):
        """Share an edited train.py under `key` (say, its hash). Writing a key again is allowed
        only with the same text."""
        old = self.get_source(key)
        if old is not None and old != text:
            raise StorageError(f"source {key!r} is already stored with other text")
        if old is None:
            self.call("storing a source", self.storage.set_study_system_attr, self.study_id,
                      f"source:{key}", text)
        self._sources[key] = text

    def get_source(self, key):
        """The text stored under `key`, or None. Sources never change, so each is read once."""
        if key not in self._sources:
            attrs = self.call("reading sources", self.storage.get_study_system_attrs,
                              self.study_id)
            self._sources.update({k[7:]: v for k, v in attrs.items() if k.startswith("source:")})
        return self._sources.get(key)

    # -- results.tsv as the view ----------------------------------------------------------

    def write_view(self, path):
        """Write `path` as a view of the whole study (view.ResultsView.write); returns the rows
        written (read-only)."""
        return self._results.write(path)

    def close(self):
        self.liveness.close()
        if self.rdb is not None:
            self.rdb.engine.dispose()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _plain(value, what):
    """A copy as the database will give it back (JSON), so a retry can compare what it wrote."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as e:
        raise ValueError(f"the {what} must be JSON-able: {e}") from None
