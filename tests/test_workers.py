"""Many workers sharing one study, as real loop.py processes: on one machine (--workers, an
embedded SQLite study) and as separate "machines" (directories) joining a study in SQLite or a
real PostgreSQL server; kill -9 of a worker mid-trial, its restart, and --trials 0 syncing."""
import os
import shutil
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from autoresearch.driver import Settings
from conftest import FAKE, FAKE_SPACE, ROOT
from test_loop import set_fake

pytestmark = pytest.mark.slow  # real loops and trainers, minutes each


@pytest.fixture(params=["sqlite", "postgres"])
def url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/study.db"
    return request.getfixturevalue("postgres_url")


def machine(root, name, sleep=0.3):
    """A working directory with the fixture trainer: what one machine of a study holds."""
    work = root / name
    work.mkdir()
    shutil.copy(FAKE, work / "train.py")
    (work / "search_space.yaml").write_text(FAKE_SPACE)
    set_fake(work / "train.py", SLEEP=sleep)
    return work


def start(work, args, data, **popen):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "loop.py"), *args], cwd=work,
                            env=dict(os.environ, AUTORESEARCH_DATA=data.dir),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def finish(proc, timeout=300):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def intervals(work, df):
    """(start, end) of each run on this machine: the trial's train.py is written just before
    the trainer starts, its log last written when it ends."""
    out = {}
    for t, log in zip(df.trial, df.log):
        if isinstance(log, str) and os.path.exists(work / log):
            d = os.path.dirname(work / log)
            out[t] = (os.stat(os.path.join(d, "train.py")).st_mtime, os.stat(work / log).st_mtime)
    return out


def assert_no_config_ran_twice_at_once(df, spans):
    """Apart from the baseline's SEEDs (run side by side on purpose), no config overlaps."""
    base = df.config[df.strategy == "baseline"].iloc[0]
    for config, group in df[df.config != base].groupby("config"):
        times = sorted(spans[t] for t in group.trial if t in spans)
        for (s1, e1), (s2, e2) in zip(times, times[1:]):
            assert s2 >= e1 - 0.05, (config, times)


def test_workers_on_one_machine_share_one_study(tmp_path, smoke_data):
    work = machine(tmp_path, "box")
    out = finish(start(work, ["--workers", "2", "--trials", "9"], smoke_data))
    assert "2 workers share" in out and "not comparable with single-worker runs" in out
    df = pd.read_csv(work / "results.tsv", sep="\t")
    assert len(df) == 9 and df.trial.is_unique and df.trial.is_monotonic_increasing
    assert set(df.worker) == {f"{os.uname().nodename}/cpu:0", f"{os.uname().nodename}/cpu:1"}
    assert (work / "results.journal").exists()  # the same study a single worker keeps
    assert (df.strategy == "baseline").sum() >= Settings().baseline_runs
    assert_no_config_ran_twice_at_once(df, intervals(work, df))
    for _, group in df.groupby("config"):
        assert group.seed.is_unique  # re-runs, never repeats
    keeps = df[df.status == "keep"]
    incumbent = keeps.params.iloc[-1]
    from autoresearch.patch import read_constants
    import json
    assert read_constants(open(work / "train.py").read(), ["MATRIX_LR", "DEPTH", "DEVICE_BATCH_SIZE"]) \
        == json.loads(incumbent)


def test_machines_join_one_study_and_sync_with_trials_0(url, tmp_path, smoke_data):
    a, b = machine(tmp_path, "a"), machine(tmp_path, "b")
    common = ["--storage", url, "--study", "night", "--trials", "4"]
    procs = [start(a, common, smoke_data), start(b, common, smoke_data)]
    for p in procs:
        finish(p)
    for work in (a, b):  # each machine's view, brought up to date without running anything
        finish(start(work, ["--storage", url, "--study", "night", "--trials", "0"], smoke_data))
    da, db = (pd.read_csv(w / "results.tsv", sep="\t") for w in (a, b))
    assert len(da) == 8 and da.trial.is_unique and da.equals(db)
    assert open(a / "train.py").read() == open(b / "train.py").read()
    spans = intervals(a, da) | intervals(b, db)
    assert_no_config_ran_twice_at_once(da, spans)
    c = machine(tmp_path, "c")  # a machine that ran nothing joins and catches up
    finish(start(c, ["--storage", url, "--study", "night", "--trials", "0"], smoke_data))
    assert pd.read_csv(c / "results.tsv", sep="\t").equals(da)
    assert open(c / "train.py").read() == open(a / "train.py").read()


def test_kill_9_of_a_worker_loses_only_its_run(url, tmp_path, smoke_data):
    a, b = machine(tmp_path, "a", sleep=4), machine(tmp_path, "b", sleep=1)
    common = ["--storage", url, "--study", "s", "--heartbeat", "1", "--lost-after", "4"]
    victim = start(a, [*common, "--trials", "20"], smoke_data)
    deadline = time.time() + 120
    while not (a / "runs").exists() or not any((a / "runs").iterdir()):
        assert time.time() < deadline and victim.poll() is None
        time.sleep(0.1)
    time.sleep(1.0)
    victim.kill()  # SIGKILL mid-trial: no row, no goodbye
    victim.wait()
    killed = int(sorted(os.listdir(a / "runs"))[-1])
    finish(start(b, [*common, "--trials", "5"], smoke_data))  # the other goes on meanwhile
    finish(start(a, [*common, "--trials", "1"], smoke_data))  # restarted: it rejoins
    df = pd.read_csv(a / "results.tsv", sep="\t")
    lost = df[df.trial == killed]
    assert lost.status.tolist() == ["crash"] and lost.error.tolist() == ["lost"]
    assert len(df) == 7 and df.trial.is_unique
    assert (df[df.trial != killed].status != "crash").all()
    assert set(df.worker) == {f"{os.uname().nodename}/cpu"}


@pytest.mark.parametrize("inherited", ["default", "ignored"])
def test_ctrl_c_stops_every_worker_and_records_their_runs(tmp_path, smoke_data, inherited):
    """Also when started as a script's background job (`loop.py ... &`), which inherits SIGINT
    ignored: kill -INT must stop it all the same."""
    work = machine(tmp_path, "box", sleep=30)
    ignore = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if inherited == "ignored" \
        else None
    proc = start(work, ["--workers", "2", "--trials", "10"], smoke_data, preexec_fn=ignore)
    deadline = time.time() + 120
    while len(list((work / "runs").glob("*/run.log")) if (work / "runs").exists() else []) < 2:
        assert time.time() < deadline
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-3000:]
    df = pd.read_csv(work / "results.tsv", sep="\t")
    assert len(df) == 2 and (df.error == "interrupted").all()


def test_real_train_py_with_two_workers(tmp_path, smoke_data):
    shutil.copy(os.path.join(ROOT, "train.py"), tmp_path / "train.py")
    (tmp_path / "search_space.yaml").write_text(
        "smoke:\n  params:\n    MATRIX_LR: {low: 0.004, high: 0.08, log: true}\n")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "loop.py"), "--workers", "2",
                           "--trials", "4", "--baseline-runs", "2", "--budget", "30"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, AUTORESEARCH_DATA=smoke_data.dir,
                                   AUTORESEARCH_STEPS="10"))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    df = pd.read_csv(tmp_path / "results.tsv", sep="\t")
    assert len(df) == 4 and (df.status != "crash").all() and df.worker.nunique() == 2
    assert (df.num_steps == 10).all() and (df.strategy[:2] == "baseline").all()


@pytest.mark.parametrize("strategy", ["tpe", "cmaes"])
def test_model_based_strategies_across_workers(strategy, tmp_path, smoke_data):
    work = machine(tmp_path, "box", sleep=0.5)
    finish(start(work, ["--workers", "2", "--trials", "10", "--strategy", strategy], smoke_data))
    df = pd.read_csv(work / "results.tsv", sep="\t")
    assert len(df) == 10 and strategy in set(df.strategy) and (df.status != "crash").all()
    assert_no_config_ran_twice_at_once(df, intervals(work, df))
