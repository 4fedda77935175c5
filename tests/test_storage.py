"""The shared study (autoresearch/storage/) against real SQLite files and a real PostgreSQL
server on 127.0.0.1, with real worker processes (tests/fixtures/storage_worker.py)."""
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import pandas as pd
import pytest

from autoresearch import storage
from autoresearch.storage import SharedStudy, StorageError, sync_results_tsv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "fixtures", "storage_worker.py")
FAST = dict(heartbeat_seconds=1, grace=2, retry_seconds=30)


@pytest.fixture(params=["journal", "sqlite", pytest.param("postgres", marks=pytest.mark.slow)])
def url(request, tmp_path):
    if request.param == "journal":  # the default: Optuna's journal file beside results.tsv
        return str(tmp_path / "study.journal")
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/study.db"
    return request.getfixturevalue("postgres_url")


def start_worker(url, *args, study="s"):
    return subprocess.Popen([sys.executable, WORKER, url, study, "--heartbeat", "1",
                             "--grace", "2", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def events(out):
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def wait_for(proc, event):
    """Read the worker's JSON lines until `event` comes; return it."""
    for line in proc.stdout:
        if line.startswith("{") and json.loads(line)["event"] == event:
            return json.loads(line)
    raise AssertionError(f"worker ended before {event!r}: {proc.stderr.read()[-2000:]}")


def finish_all(procs, timeout=120):
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, err[-3000:]
        outs.append(events(out))
    return outs


def test_workers_record_every_trial_once_and_never_run_one_config_twice(url, tmp_path):
    """4 processes x 5 trials over 3 configs: exactly 20 rows, unique numbers, and two trials of
    one config never overlap in time, while a reader keeps loading results.tsv with pandas."""
    results = tmp_path / "results.tsv"
    stop, reads, bad = threading.Event(), [], []

    def reader():
        while not stop.is_set():
            if results.exists():
                try:
                    reads.append(len(pd.read_csv(results, sep="\t")))
                except Exception as e:  # noqa: BLE001 - any failure to read is the finding
                    bad.append(repr(e))
            time.sleep(0.005)

    t = threading.Thread(target=reader)
    t.start()
    procs = [start_worker(url, "--worker", f"w{i}", "--trials", "5", "--seconds", "0.1",
                          "--configs", "3", "--results", str(results)) for i in range(4)]
    try:
        outs = finish_all(procs)
    finally:
        stop.set()
        t.join()
    assert not bad
    assert reads and max(reads) == 20
    refused = sum(e["event"] == "refused" for out in outs for e in out)
    assert refused > 0, "3 configs for 4 workers must make some reservations wait"
    df = pd.read_csv(results, sep="\t")
    assert len(df) == 20 and df["trial"].is_unique
    assert sorted(df["trial"]) == list(df["trial"])
    assert df.groupby("worker").size().to_dict() == {f"w{i}": 5 for i in range(4)}
    # started_at/log carry when each worker held its trial: inside the RUNNING span in the study
    for config, runs in df.groupby("config"):
        spans = sorted(zip(runs["started_at"], runs["log"]))
        for (_, end), (start, _) in zip(spans, spans[1:]):
            assert start >= end, f"two trials of {config} ran at once"
    with SharedStudy(url, "s", **FAST) as shared:
        assert [int(r["trial"]) for r in shared.rows()] == list(df["trial"])
        assert shared.running() == []


@pytest.mark.slow
def test_simultaneous_reservations_of_one_config_give_it_to_one_worker(url, tmp_path):
    """Six processes ask for the same config at the same instant and hold what they get: one
    trial only, the others are refused (atomic check, lowest number wins)."""
    go = tmp_path / "go"
    procs = [start_worker(url, "--worker", f"w{i}", "--configs", "1", "--hold",
                          "--trials", "1", "--go", str(go)) for i in range(6)]
    try:
        for p in procs:
            wait_for(p, "open")
        go.touch()
        deadline = time.time() + 60
        with SharedStudy(url, "s", **FAST) as shared:
            # every worker has either reserved it or been refused at least once
            seen = {}
            while len(seen) < 6 and time.time() < deadline:
                for i, p in enumerate(procs):
                    if i not in seen:
                        line = p.stdout.readline()
                        if line.startswith("{"):
                            seen[i] = json.loads(line)
            assert len(seen) == 6
            got = [e for e in seen.values() if e["event"] == "reserved"]
            assert len(got) == 1
            running = shared.running()
            assert [j["number"] for j in running] == [got[0]["number"]]
            for p in procs:
                p.kill()
                p.communicate()
            time.sleep(FAST["grace"] + 1.5)
            # withdrawn reservations (the losers of the race, if they got that far) are no rows
            assert [(int(r["trial"]), r["error"]) for r in shared.rows()] == [
                (got[0]["number"], "lost")]
    finally:
        for p in procs:
            p.kill()
            p.communicate()


@pytest.mark.slow
def test_killed_worker_becomes_a_lost_crash_and_the_others_go_on(url):
    holder = start_worker(url, "--worker", "victim", "--hold")
    mine = wait_for(holder, "reserved")
    other = start_worker(url, "--worker", "steady", "--trials", "4", "--seconds", "1.5")
    time.sleep(1)
    os.kill(holder.pid, signal.SIGKILL)
    holder.communicate()
    finish_all([other])
    with SharedStudy(url, "s", **FAST) as shared:
        time.sleep(3)  # past the grace, whatever the steady worker's last sweep saw
        rows = {int(r["trial"]): r for r in shared.rows()}
        lost = rows[mine["number"]]
        assert lost["status"] == "crash" and lost["error"] == "lost"
        assert lost["worker"] == "victim" and lost["config"] == mine["config"]
        assert lost["params"] == {"X": mine["config"]}
        assert sum(r["worker"] == "steady" and r["status"] != "crash" for r in rows.values()) == 4
        # the victim restarts under its name and rejoins
        again = start_worker(url, "--worker", "victim", "--trials", "2", "--seconds", "0.1")
        finish_all([again])
        rows = shared.rows()
        assert len(rows) == 7
        assert len({int(r["trial"]) for r in rows}) == 7
        assert shared.running() == []


def test_finish_is_idempotent_and_a_late_finish_replaces_the_lost_trial(url):
    with SharedStudy(url, "s", **FAST) as a, SharedStudy(url, "s", **FAST) as b:
        n = a.reserve({"config": "x", "worker": "a"})
        row = {"trial": n, "val_bpb": 1.25, "status": "keep", "config": "x", "worker": "a"}
        assert a.finish(n, row, 1.25) == n
        assert a.finish(n, row, 1.25) == n  # a retry after a lost answer
        m = a.reserve({"config": "y", "worker": "a"})
        a.liveness.release(a._numbers[m])  # fault: this worker's beats stop reaching the database
        time.sleep(FAST["grace"] + 1.5)
        assert [r["error"] for r in b.rows() if int(r["trial"]) == m] == ["lost"]
        late = {"trial": m, "val_bpb": 1.5, "status": "discard", "config": "y", "worker": "a"}
        new = a.finish(m, late, 1.5)
        assert new != m
        rows = b.rows()
        assert [(int(r["trial"]), r["val_bpb"]) for r in rows] == [(n, 1.25), (m, 1.5)]
        assert a.finish(m, late, 1.5) == new  # and a retry of that does not add another
        assert len(b.rows()) == 2


def test_crash_rows_never_half_written_and_not_finite_values_fail(url):
    with SharedStudy(url, "s", **FAST) as s:
        n = s.reserve({"config": "x"})
        s.finish(n, {"trial": n, "status": "crash", "error": "nan", "config": "x"}, float("nan"))
        t = s.study.trials[n]
        assert t.state.name == "FAIL" and t.user_attrs["row"]["error"] == "nan"
        with pytest.raises(ValueError, match="reserved"):
            s.reserve({"config": "y", "reservation": "mine"})
        with pytest.raises(ValueError, match="JSON-able"):
            s.reserve({"config": "y", "when": object()})
        m = s.reserve({"config": "z"})
        row = {"trial": m, "val_bpb": 1.5, "status": "keep", "params": {"WINDOW": (8, 4)}}
        assert s.finish(m, row, 1.5) == m
        assert s.finish(m, row, 1.5) == m  # a tuple came back a list: still the same row
        assert s.rows()[-1]["params"] == {"WINDOW": [8, 4]}


def test_params_with_distributions_are_optuna_params(tmp_path):
    """What optuna-dashboard plots (and an Optuna sampler reads) are the trials' params."""
    import optuna
    url = f"sqlite:///{tmp_path}/study.db"
    dists = {"MATRIX_LR": optuna.distributions.FloatDistribution(0.01, 0.3, log=True),
             "DEPTH": optuna.distributions.CategoricalDistribution([2, 4, 8])}
    with SharedStudy(url, "s", **FAST) as s:
        n = s.reserve({"config": "x", "params": {"MATRIX_LR": 0.04, "DEPTH": 4, "SEED": 1}},
                      distributions=dists)
        s.finish(n, {"trial": n, "val_bpb": 1.3, "status": "keep"}, 1.3)
        loaded = optuna.load_study(study_name="s", storage=url)
        assert loaded.trials[0].params == {"MATRIX_LR": 0.04, "DEPTH": 4}
        assert loaded.best_value == 1.3


def test_sources_are_shared_between_workers(url):
    text = "# an edited train.py\n" + "x = 1  # padding\n" * 1500  # about 25 KB
    with SharedStudy(url, "s", **FAST) as a, SharedStudy(url, "s", **FAST) as b:
        a.put_source("abc123", text)
        a.put_source("abc123", text)
        assert b.get_source("abc123") == text
        assert b.get_source("missing") is None
        with pytest.raises(StorageError, match="other text"):
            b.put_source("abc123", text + "#")


def test_sync_refuses_to_overwrite_rows_the_study_lacks_and_imports_them(tmp_path):
    url = f"sqlite:///{tmp_path}/study.db"
    old = tmp_path / "results.tsv"
    from autoresearch import ledger
    ledger.write_atomic(str(old), ledger.HEADER + "".join(ledger.format_row(r) for r in (
        {"val_bpb": 1.9, "status": "keep", "description": "baseline", "trial": 0},
        {"val_bpb": 0, "status": "crash", "error": "oom", "trial": 2})))
    before = ledger.Ledger(str(old)).rows()
    with SharedStudy(url, "s", **FAST) as s:
        with pytest.raises(StorageError, match=r"holds trial\(s\) 0, 2"):
            sync_results_tsv(s, old)
        assert len(pd.read_csv(old, sep="\t")) == 2  # untouched
        s.import_rows(before)
        n = s.reserve({"config": "x"})
        assert n == 3  # after the gap the old file had at 1
        s.finish(n, {"trial": n, "val_bpb": 1.8, "status": "keep", "config": "x"}, 1.8)
        sync_results_tsv(s, old)
        df = pd.read_csv(old, sep="\t")
        assert list(df.columns) == storage.COLUMNS
        assert list(df["trial"]) == [0, 2, 3] and list(df["status"]) == ["keep", "crash", "keep"]
        with pytest.raises(StorageError, match="not empty"):
            s.import_rows(before)
    with SharedStudy(url, "another", **FAST) as other:  # a view of another study: refused
        n = other.reserve({"config": "x"})
        other.finish(n, {"trial": n, "val_bpb": 1.7, "status": "keep", "config": "x"}, 1.7)
        with pytest.raises(StorageError, match=r"holds trial\(s\) 2, 3 that study 'another'"):
            sync_results_tsv(other, old)
    assert list(pd.read_csv(old, sep="\t")["val_bpb"]) == [1.9, 0, 1.8]


@pytest.mark.slow
def test_postgres_outage_is_retried_and_a_long_one_stops_with_a_clear_error(
        postgres_server, postgres_url):
    with SharedStudy(postgres_url, "s", heartbeat_seconds=1, grace=30, retry_seconds=20) as s:
        n = s.reserve({"config": "x"})
        postgres_server.stop()
        threading.Timer(3, postgres_server.start).start()
        t0 = time.time()
        assert s.finish(n, {"trial": n, "val_bpb": 1.1, "status": "keep"}, 1.1) == n
        assert time.time() - t0 >= 2.5  # it did wait for the server
        m = s.reserve({"config": "y"})
        assert m == n + 1
        s.retry_seconds = 3
        postgres_server.stop()
        try:
            t0 = time.time()
            with pytest.raises(StorageError, match=r"database unreachable for \d+ s while "
                                                   r"finishing trial"):
                s.finish(m, {"trial": m, "val_bpb": 1.2, "status": "keep"}, 1.2)
            assert 2.5 <= time.time() - t0 < 15
        finally:
            postgres_server.start()
        s.retry_seconds = 20
        assert [int(r["trial"]) for r in s.rows()] == [n]  # nothing half written for m
        assert [j["number"] for j in s.running()] == [m]


def test_sqlite_lock_held_by_another_process_is_waited_for_then_reported(tmp_path):
    url = f"sqlite:///{tmp_path}/study.db"
    with SharedStudy(url, "s", heartbeat_seconds=1, grace=5, retry_seconds=3) as s:
        con = sqlite3.connect(tmp_path / "study.db", isolation_level=None,
                              check_same_thread=False)
        con.execute("BEGIN EXCLUSIVE")
        threading.Timer(1.0, con.rollback).start()
        assert s.reserve({"config": "x"}) == 0  # waited out a 1 s lock
        con.execute("BEGIN EXCLUSIVE")
        try:
            t0 = time.time()
            with pytest.raises(StorageError, match="database unreachable for .*database is locked"):
                s.reserve({"config": "y"}, unique=())
            assert time.time() - t0 < 30
        finally:
            con.rollback()
        assert [j["config"] for j in s.running()] == ["x"]


def test_postgres_url_uses_the_shipped_driver():
    assert storage.normalize_url("postgresql://u:p@h:5/db") == "postgresql+psycopg://u:p@h:5/db"
    assert storage.normalize_url("results.db") == "sqlite:///" + os.path.abspath("results.db")
