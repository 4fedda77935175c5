"""The loop end to end: greedy ratchet, resume after kill -9, OOM retry, Ctrl-C, bad spaces,
git, dry run; with fixture trainers where the answer must be known, and the real train.py."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from autoresearch import history
from autoresearch.driver import Driver, LoopError, Settings
from autoresearch.patch import patch_constants, read_constants
from conftest import FAKE, FAKE_SPACE, ROOT

SEARCHED = ["MATRIX_LR", "DEPTH", "DEVICE_BATCH_SIZE"]


@pytest.fixture
def work(tmp_path, smoke_data, monkeypatch):
    """A working directory holding a fake train.py and its search space."""
    monkeypatch.setenv("AUTORESEARCH_DATA", smoke_data.dir)
    monkeypatch.chdir(tmp_path)
    shutil.copy(FAKE, tmp_path / "train.py")
    (tmp_path / "search_space.yaml").write_text(FAKE_SPACE)
    return tmp_path


def set_fake(path, **constants):
    src = open(path).read()
    open(path, "w").write(patch_constants(src, constants))


def searched(path="train.py"):
    return read_constants(open(path).read(), SEARCHED)


def loop_cli(args, cwd, env_extra=None, **kw):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, os.path.join(ROOT, "loop.py"), *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300, **kw)


def test_greedy_ratchet_is_cumulative_and_train_py_holds_the_best(work):
    """The noise judge on a repeatable trainer: the baseline runs three times, a better
    challenger is re-run once before it is kept, a worse one is discarded after one run."""
    driver = Driver(Settings(seed=3, grace=30, baseline_runs=3, confidence=0.95, drop=0.0,
                             incumbent_rule="race", prune="off"), log=lambda *a: None)
    rows = [driver.step() for t in range(3)]
    assert [r["status"] for r in rows] == ["keep"] * 3 and {r["config"] for r in rows} == {rows[0]["config"]}
    assert [r["seed"] for r in rows] == [42, 43, 44] and rows[2]["runs"] == 3
    for trial in range(3, 20):
        before = searched()
        best_before, best_mean = driver.best()
        row = driver.step()
        rows.append(row)
        if row["description"].startswith("incumbent re-run"):  # at the start of a race
            assert row["status"] == "keep" and row["params"] == best_before and searched() == before
            continue
        if row["status"] == "keep":
            assert searched() == row["params"]   # the keep is now train.py
            assert row["runs"] == 2 and float(row["mean_bpb"]) < best_mean
        else:
            assert searched() == before          # a discard or a retest leaves it alone
        if row["description"].startswith("retest"):
            continue
        assert row["params"] == best_before | row["changes"]  # the incumbent plus its changes
        assert 1 <= len(row["changes"]) <= 2
        if row["status"] == "discard":
            assert float(row["val_bpb"]) >= best_mean  # worse at once: no second run
    kept = [r for r in rows[3:] if r["status"] == "keep" and not r["description"].startswith("incumbent")]
    assert len(kept) >= 2, [r["description"] for r in rows]
    means = [float(r["mean_bpb"]) for r in kept]
    assert means == sorted(means, reverse=True)   # every keep beat the incumbent before it
    df = pd.read_csv("results.tsv", sep="\t")
    assert len(df) == 20 and df.trial.tolist() == list(range(20))
    for config, group in df.groupby("config"):  # a config's runs share its values, not its SEEDs
        assert group.params.nunique() == 1 and group.seed.is_unique
        assert group.runs.tolist() == list(range(1, len(group) + 1))
    assert set(df.status) <= {"keep", "discard", "retest"} and (df.worker != "").all()


def test_threshold_judge_keeps_single_runs(work):
    driver = Driver(Settings(seed=3, grace=30, judge="threshold", baseline_runs=1),
                    log=lambda *a: None)
    rows = [driver.step() for t in range(8)]
    assert rows[0]["description"] == "baseline"
    assert all(r["runs"] == 1 for r in rows) and "retest" not in {r["status"] for r in rows}
    best = float(rows[0]["val_bpb"])
    for r in rows[1:]:
        assert r["status"] == ("keep" if float(r["val_bpb"]) < best else "discard")
        best = min(best, float(r["val_bpb"]))


@pytest.mark.slow
def test_real_train_py_race_report_and_recheck(tmp_path, smoke_data):
    """The real trainer on the smoke profile: a baseline whose output head learns ten times too
    slowly against the one candidate the space allows (the default rate), raced, kept on its
    mean; then `report` and `recheck` on those runs. Runs train a fixed number of steps, so the only noise is
    the SEED's, whatever the load on the machine."""
    shutil.copy(os.path.join(ROOT, "train.py"), tmp_path / "train.py")
    set_fake(tmp_path / "train.py", UNEMBEDDING_LR=0.0004)
    (tmp_path / "search_space.yaml").write_text(
        "smoke:\n  params:\n    UNEMBEDDING_LR: {choices: [0.0004, 0.004]}\n")
    env = {"AUTORESEARCH_DATA": smoke_data.dir, "AUTORESEARCH_STEPS": "20"}
    proc = loop_cli(["--trials", "5", "--budget", "30", "--baseline-runs", "2", "--confidence",
                     "0.95", "--drop", "0", "--incumbent-rule", "race", "--prune", "off"],
                    tmp_path, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    df = pd.read_csv(tmp_path / "results.tsv", sep="\t")
    assert len(df) == 5 and df.description[0] == "baseline" and (df.status != "crash").all()
    assert df.strategy.tolist() == ["baseline"] * 2 + ["greedy", "baseline", "greedy"]
    assert df.seed.tolist() == [42, 43, 42, 44, 43]  # the incumbent re-run at the race's start
    assert df.status.tolist() == ["keep", "keep", "retest", "keep", "keep"], df.description
    assert df.runs.tolist() == [1, 2, 1, 3, 2] and df.mean_bpb[4] < df.mean_bpb[3]
    assert (df.val_bpb > smoke_data.floor_bpb).all() and (df.num_steps == 20).all()
    assert (df.profile == "smoke").all() and df.started_at.str.endswith("Z").all()
    for log in df.log:
        assert "\n---\n" in open(tmp_path / log).read()
    assert "UNEMBEDDING_LR = 0.004" in open(tmp_path / "train.py").read()
    recheck = loop_cli(["recheck", "--runs", "1"], tmp_path, env)  # no --budget: the file's
    assert recheck.returncode == 0, recheck.stderr[-3000:]
    assert "% of the recorded gain survives" in recheck.stdout
    df = pd.read_csv(tmp_path / "results.tsv", sep="\t")
    assert df.strategy.tolist()[5:] == ["recheck", "recheck"] and df.seed.tolist()[5:] == [45, 44]
    assert df.status.tolist()[5:] == ["discard", "keep"] and (df.num_steps == 20).all()
    report = loop_cli(["report"], tmp_path)
    assert report.returncode == 0, report.stderr
    assert "noise floor: val_bpb std" in report.stdout and "confirmed gain:" in report.stdout
    assert "incumbent: " in report.stdout and "(mean of 3 runs" in report.stdout
    assert "recheck: recorded gain" in report.stdout
    assert (tmp_path / "progress.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_resume_after_kill_9_mid_trial(work):
    set_fake("train.py", SLEEP=1.0)
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "loop.py"), "--trials", "6"],
                            cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (work / "runs" / "0002" / "run.log").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    proc.kill()  # SIGKILL: no cleanup of any kind
    proc.wait()
    df = pd.read_csv(work / "results.tsv", sep="\t")
    assert df.trial.tolist() == [0, 1]  # whole rows only
    time.sleep(0.5)
    ps = subprocess.run(["pgrep", "-f", str(work / "runs")], capture_output=True, text=True)
    assert ps.stdout.strip() == ""  # the trainer died with the loop
    best_before = searched()
    resumed = loop_cli(["--trials", "2"], work)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    df = pd.read_csv(work / "results.tsv", sep="\t")
    # the killed run is a crash row `lost` (the study saw it start), then two more runs
    assert df.trial.tolist() == [0, 1, 2, 3, 4] and df.description[0] == "baseline"
    assert (df.status[2], df.error[2]) == ("crash", "lost")
    assert (df.description == "baseline").sum() == 1
    keeps = df[df.status == "keep"]
    best = json.loads(keeps.loc[keeps.val_bpb.idxmin(), "params"])
    assert searched() == best and (best_before == best or len(keeps) > 1)


def test_resume_restores_a_drifted_train_py(work):
    driver = Driver(Settings(seed=1, grace=30), log=lambda *a: None)
    for trial in range(4):
        driver.step()
    best = searched()
    set_fake("train.py", MATRIX_LR=0.011, DEPTH=3)  # somebody edited it by hand
    messages = []
    Driver(Settings(seed=1, grace=30), log=messages.append)
    assert searched() == best and "restored train.py" in messages[0]


def test_oom_retry_halves_the_micro_batch(work):
    set_fake("train.py", BEHAVIOUR="oom_above_4", DEVICE_BATCH_SIZE=16)
    driver = Driver(Settings(grace=30), log=lambda *a: None)
    row = driver.step()
    assert row["status"] == "keep"
    assert row["description"] == "baseline (oom retry: DEVICE_BATCH_SIZE 16->4)"
    assert row["params"]["DEVICE_BATCH_SIZE"] == 4 and searched()["DEVICE_BATCH_SIZE"] == 4
    assert sorted(os.listdir(work / "runs" / "0000")) == ["run.log", "run.oom1.log",
                                                          "run.oom2.log", "train.py"]
    assert "DEVICE_BATCH_SIZE=8" in open(work / "runs" / "0000" / "run.oom2.log").read()
    # the study keeps the retry as a typed field, which is what the loop reads back
    stored = driver.record.rows()[0]
    assert stored["oom_retry"] == [16, 4] and stored["kind"] == "baseline" and stored["code"]
    run = driver.runs[0]
    assert run.oom_retry == (16, 4) and run.code == stored["code"]
    stored["description"] = "baseline"  # not parsed from the text any more
    assert history.Run.from_row(stored).oom_retry == (16, 4)


def test_oom_beyond_the_retry_limit_is_a_crash(work):
    set_fake("train.py", BEHAVIOUR="oom_above_4", DEVICE_BATCH_SIZE=16)
    driver = Driver(Settings(grace=30, oom_retries=1), log=lambda *a: None)
    with pytest.raises(LoopError, match="baseline crashed .oom."):
        driver.step()
    df = pd.read_csv("results.tsv", sep="\t")
    assert df.status.tolist() == ["crash"] and df.error.tolist() == ["oom"]
    assert df.val_bpb.tolist() == [0.0]


def test_crashes_and_timeouts_are_rows_and_the_loop_goes_on(work):
    driver = Driver(Settings(grace=2, time_budget=1, baseline_runs=1), log=lambda *a: None)
    driver.step()
    base = open("train.py").read()
    set_fake("train.py", BEHAVIOUR="hang")  # every candidate from now on hangs
    row = driver.step()
    assert row["status"] == "crash" and row["error"] == "timeout"
    set_fake("train.py", BEHAVIOUR="traceback")
    row = driver.step()
    assert row["status"] == "crash" and row["error"].startswith("error: ValueError: boom")
    open("train.py", "w").write(base)
    row = driver.step()
    assert row["status"] in ("keep", "discard", "retest")


@pytest.mark.parametrize("delay", [0.0, 0.005, 0.5])
def test_ctrl_c_records_interrupted_and_keeps_the_best(work, delay):
    """Early delays land while the trainer is being started: once, a KeyboardInterrupt there
    was dropped inside the fork and the loop ran on, or left the trial without a row."""
    set_fake("train.py", BEHAVIOUR="hang_if_changed")  # the baseline runs, any candidate hangs
    best = searched()
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "loop.py"), "--trials", "3",
                             "--baseline-runs", "1"],
                            cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (work / "runs" / "0001" / "run.log").exists() and time.time() < deadline:
        time.sleep(0.001)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err
    df = pd.read_csv(work / "results.tsv", sep="\t")
    assert df.status.tolist() == ["keep", "crash"] and df.error.tolist()[-1] == "interrupted"
    assert searched() == best


@pytest.mark.parametrize("space,message", [
    ("smoke:\n  params:\n    NOT_A_CONSTANT: {choices: [1]}\n", "NOT_A_CONSTANT"),
    ("smoke:\n  params:\n    DEPTH: {choices: []}\n", "DEPTH: choices must be a non-empty list"),
    ("smoke:\n  params:\n    DEPTH: {choices: [1, 2.5]}\n", "choice 2.5 is a float"),
    ("smoke:\n  params:\n    DEPTH: {choices: [1]}\n  constraints: ['DEPTH >']\n",
     "constraint 'DEPTH >' cannot be used"),
    ("cpu:\n  params:\n    DEPTH: {choices: [1]}\n", "no section for profile 'smoke'"),
])
def test_bad_search_space_fails_before_any_run(work, space, message):
    (work / "search_space.yaml").write_text(space)
    proc = loop_cli(["--trials", "1"], work)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not (work / "results.tsv").exists() and not (work / "runs").exists()


def test_dry_run_prints_candidates_and_runs_nothing(work):
    proc = loop_cli(["--dry-run", "--trials", "4"], work)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.strip().splitlines()) == 4
    assert os.listdir(work) == ["train.py", "search_space.yaml"] or \
        sorted(os.listdir(work)) == ["search_space.yaml", "train.py"]


def test_refuses_to_mix_another_dataset(work, tmp_path_factory):
    driver = Driver(Settings(grace=30), log=lambda *a: None)
    driver.step()
    import prepare
    other = tmp_path_factory.mktemp("other")
    assert prepare.main(["--profile", "smoke", "--synthetic-docs", "1500", "--cache-dir",
                         str(other)]) == 0
    name = open(other / "current").read().strip()
    proc = loop_cli(["--trials", "1"], work, {"AUTORESEARCH_DATA": str(other / "prepared" / name)})
    assert proc.returncode == 2 and "use another --results file" in proc.stderr


def test_space_exhaustion_is_reported_not_looped(work):
    (work / "search_space.yaml").write_text(
        "smoke:\n  mutate: [1, 1]\n  params:\n    DEPTH: {choices: [1, 2, 3]}\n")
    driver = Driver(Settings(grace=30, max_proposals=50), log=lambda *a: None)
    with pytest.raises(LoopError, match="exhausted"):
        for trial in range(12):  # the baseline (DEPTH 2), the two other depths, their re-runs
            driver.step()
    assert sorted(c.params["DEPTH"] for c in driver.configs.values()) == [1, 2, 3]
    assert trial < 12


def test_git_ratchet_commits_each_keep(work):
    git = lambda *a: subprocess.run(["git", *a], cwd=work, capture_output=True, text=True,
                                    check=True).stdout.strip()
    git("init", "-q")
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "--allow-empty", "-m", "root")
    git("add", "train.py", "search_space.yaml")
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", "start")
    os.environ.setdefault("GIT_AUTHOR_NAME", "t")
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    proc = loop_cli(["--trials", "10", "--git", "--tag", "test"], work, env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert git("rev-parse", "--abbrev-ref", "HEAD") == "autoresearch/test"
    df = pd.read_csv(work / "results.tsv", sep="\t", dtype={"commit": str})
    keeps = df[df.status == "keep"]
    new_incumbents = keeps[keeps.config != keeps.config.shift()].iloc[1:]  # after the baseline
    messages = git("log", "--format=%s", "HEAD~%d..HEAD" % len(new_incumbents)).splitlines()
    assert len(messages) == len(new_incumbents) >= 1
    assert all(m.startswith("val_bpb ") and " over 2 runs: " in m for m in messages)
    assert git("log", "--format=%s", "-1", "HEAD~%d" % len(new_incumbents)) == "start"
    assert df.commit.iloc[-1] == git("rev-parse", "--short", "HEAD")


@pytest.mark.slow
def test_hours_limit_stops_an_open_ended_loop(work):
    t0 = time.time()
    proc = loop_cli(["--hours", "0.001"], work)  # 3.6 s, no --trials: would run forever
    assert proc.returncode == 0, proc.stderr[-2000:]
    df = pd.read_csv(work / "results.tsv", sep="\t")
    assert len(df) >= 2 and time.time() - t0 < 60
    report = loop_cli(["report", "--results", str(work / "results.tsv"), "--plot",
                       str(work / "p.png")], work)
    assert report.returncode == 0 and f"runs: {len(df)} |" in report.stdout
    assert (work / "p.png").exists()


def test_oom_lessons_shrink_later_candidates_before_they_run(work):
    """After the baseline needed OOM retries, no later trial wastes a run on a size that is known
    not to fit (except to learn a new lesson: the fake also fails at DEPTH 1, which is smaller)."""
    set_fake("train.py", BEHAVIOUR="oom_above_4")
    driver = Driver(Settings(seed=0, grace=30), log=lambda *a: None)
    driver.step()
    rows = [driver.step() for t in range(1, 9)]
    wasted = [t for t in range(1, 9)
              if any(f.startswith("run.oom") for f in os.listdir(work / "runs" / f"{t:04d}"))]
    assert len(wasted) <= 1, wasted
    assert any("predicted oom: DEVICE_BATCH_SIZE" in r["description"] for r in rows)
    assert all(r["params"]["DEVICE_BATCH_SIZE"] <= 4 for r in rows if r["status"] != "crash")


def test_the_loop_writes_the_profiles_values_into_train_py_and_ids_stay(tmp_path, smoke_data,
                                                                           monkeypatch):
    """train.py ships with None for the profile's defaults; a loop's start writes them in, so
    the file shows the recipe that runs, and the baseline keeps the id it had as None."""
    monkeypatch.setenv("AUTORESEARCH_DATA", smoke_data.dir)
    monkeypatch.chdir(tmp_path)
    shutil.copy(os.path.join(ROOT, "train.py"), "train.py")
    shutil.copy(os.path.join(ROOT, "search_space.yaml"), "search_space.yaml")
    shipped = open("train.py").read()
    assert read_constants(shipped)["DEPTH"] is None
    Driver(Settings(dry_run=True), log=lambda *a: None)
    assert open("train.py").read() == shipped  # a dry run writes nothing
    messages = []
    driver = Driver(Settings(), log=messages.append)
    now = read_constants(open("train.py").read())
    assert now["DEPTH"] == smoke_data.profile.train["DEPTH"] and None not in now.values()
    assert any("so it shows the recipe that runs" in m for m in messages), messages
    ws = driver.workspace
    assert ws.fingerprint(open("train.py").read()) == ws.fingerprint(shipped)
    job, _ = driver.schedule.reserve(driver.standing, driver.reload)
    assert job.purpose == "baseline" and "DEPTH = 2" in job.source
    assert job.config == ws.config_of(ws.searched(shipped), shipped)
    driver.close()
