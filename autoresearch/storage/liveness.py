"""Which trials are alive: the owner of a trial, the heartbeats of this process's trials, and the
sweep that fails the trials of workers that died (kill -9, a lost machine) or hung past their
deadline. Such a trial reads back as a crash row, error `lost` (lost_row)."""
import logging
import os
import socket
import threading
import time
import warnings

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from autoresearch import ledger

log = logging.getLogger("autoresearch.storage")


class Liveness:
    """The liveness of one SharedStudy's trials. `shared` is the study it serves: its Optuna
    storage (`storage`, `rdb`, `study`, `study_id`) and its retried `call`.

    heartbeat_seconds: how often this process records that its trials are alive.
    grace: seconds without a heartbeat after which any worker fails the trial.
    """

    def __init__(self, shared, heartbeat_seconds, grace):
        self.shared = shared
        self.heartbeat_seconds, self.grace = heartbeat_seconds, grace
        self._held = {}               # trial_id -> number, the trials this process runs
        self._last_sweep = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._beater = None

    def hold(self, trial_id, number):
        """Beat for trial `trial_id` (number `number`) from now until it is released."""
        with self._lock:
            self._held[trial_id] = number
        self._start()

    def release(self, trial_id):
        with self._lock:
            self._held.pop(trial_id, None)

    def sweep(self):
        """Fail the trials of workers that stopped beating (Optuna's own check, run here because
        Optuna runs it only inside Study.optimize) and those past their deadline. It reads
        every running trial, so with N workers sweeping the cost grows as N^2: each worker
        sweeps at most every half grace, and a lost trial is still failed within 1.5 graces."""
        now = time.monotonic()
        if now - self._last_sweep < self.grace / 2:
            return
        self._last_sweep = now
        s = self.shared
        with self._lock:
            held = list(self._held)
        for trial_id in held:  # our own trials are alive, whatever the beat thread managed
            s.call("recording a heartbeat", self.heartbeat, trial_id)
        if s.rdb is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                s.call("failing stale trials", optuna.storages.fail_stale_trials, s.study)
        for t in s.call("reading running trials", s.storage.get_all_trials,
                        s.study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            if t._trial_id in held:
                continue
            deadline = t.user_attrs.get("job", {}).get("deadline")
            if (deadline is not None and time.time() > deadline + self.grace
                    or s.rdb is None and self._silent(t) or _owner_gone(t)):
                try:
                    s.call("failing a lost trial",
                           s.storage.set_trial_state_values, t._trial_id, TrialState.FAIL)
                except UpdateFinishedTrialError:
                    pass

    def heartbeat(self, trial_id):
        """Say that a trial of this process is alive: Optuna's heartbeat on an RDB storage; on
        the journal, which has none, the time in a system attribute."""
        if self.shared.rdb is not None:
            self.shared.storage.record_heartbeat(trial_id)
        else:
            self.shared.storage.set_trial_system_attr(trial_id, "heartbeat", time.time())

    def _silent(self, trial):
        """A journal trial whose last beat (or start) is older than the grace."""
        beat = trial.system_attrs.get("heartbeat")
        if beat is None and trial.datetime_start is not None:
            beat = trial.datetime_start.timestamp()
        return beat is not None and time.time() - beat > self.grace

    def _start(self):
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
                    self.heartbeat(trial_id)
                except Exception as e:  # noqa: BLE001 - a beat must never kill the worker
                    log.warning("heartbeat of trial %s failed: %s", trial_id, e)

    def close(self):
        """Stop beating."""
        self._stop.set()
        if self._beater is not None:
            self._beater.join(timeout=self.heartbeat_seconds + 5)


def lost_row(trial, job, rows):
    """The crash row, error `lost`, of a trial whose worker vanished, filled from its `job`;
    `rows` ({number: (trial id, row)}) are the rows before it, to count the config's runs."""
    row = {c: job[c] for c in ledger.COLUMNS if c in job}
    config = row.get("config")
    runs = sum(1 for n, (_, r) in rows.items() if n < trial.number and config
               and r.get("config") == config and r.get("status") != "crash")
    return row | {"trial": trial.number, "status": "crash", "error": "lost", "val_bpb": 0.0,
                  "memory_gb": 0.0, "mean_bpb": 0.0, "runs": runs}


_owners = {}


def process_owner():
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
    owner, me = trial.user_attrs.get("job", {}).get("owner"), process_owner()
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
