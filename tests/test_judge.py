"""The noise-aware judge: verdicts on scripted sequences of values, the races the driver runs
from them, resume in the middle of a race, and results files from before the judge existed."""
import io
import os
import shutil
import subprocess
import sys
import time

import pandas as pd
import pytest

from autoresearch import history
from autoresearch.driver import Driver, Settings
from autoresearch.judge import NoiseJudge, ThresholdJudge, noise_floor, seed_fit
from autoresearch.runner import Outcome
from conftest import FAKE, FAKE_SPACE, ROOT
from test_loop import loop_cli, set_fake


def config(values, first_trial=10, trials=None):
    c = history.Config("c", {}, "params", "greedy", "", first_trial, status="retest")
    c.values = list(values)
    c.trials = trials or list(range(first_trial, first_trial + len(values)))
    return c


INCUMBENT = config([1.00, 1.01, 0.99], first_trial=0)   # std 0.01 over 3 runs
NOISE = noise_floor({"i": INCUMBENT})


def verdicts(challenger_values, incumbent=INCUMBENT, judge=None):
    judge = judge or NoiseJudge()
    out = []
    for n in range(1, len(challenger_values) + 1):
        c = config(challenger_values[:n])
        noise = noise_floor({"i": incumbent, "c": c})
        out.append(judge.verdict(c, incumbent, noise).status)
    return out


def test_decide_gives_every_run_its_verdict_and_only_a_challenger_goes_to_the_rule():
    ahead = config([0.90, 0.91])
    ahead.id = "a"  # (INCUMBENT's id is "c")
    configs = {"c": INCUMBENT, "a": ahead}
    for judge in (NoiseJudge(), ThresholdJudge()):
        decide = judge.decide
        assert decide("new", Outcome(False, "pruned at 40%: loss 3.2", pruned=True), ahead,
                      INCUMBENT, configs).status == "pruned"
        assert decide("retest", Outcome(False, "oom"), ahead, INCUMBENT, configs) == \
            judge.decide("new", Outcome(False, "oom"), ahead, INCUMBENT, configs)
        assert decide("new", Outcome(False, "oom"), ahead, INCUMBENT, configs).reason == "oom"
        assert decide("incumbent", Outcome(True), INCUMBENT, INCUMBENT, configs).status == "keep"
        assert decide("baseline", Outcome(True), INCUMBENT, None, configs).status == "keep"
        # a recheck measures the incumbent: a better-looking config's run never replaces it
        assert decide("recheck", Outcome(True), ahead, INCUMBENT, configs).status == "discard"
        assert decide("retest", Outcome(True), ahead, INCUMBENT, configs).status == "keep"


def test_a_clear_win_is_kept_on_its_second_run():
    assert verdicts([0.90, 0.91]) == ["retest", "keep"]


def test_a_clear_loss_is_discarded_after_one_run():
    assert verdicts([1.05]) == ["discard"]
    assert verdicts([1.0]) == ["discard"]  # no better at all: nothing to race for


def test_inconclusive_then_confirmed():
    assert verdicts([0.99, 0.975, 0.97]) == ["retest", "retest", "keep"]


def test_inconclusive_then_rejected_after_max_runs():
    assert verdicts([0.995, 0.998, 0.996]) == ["retest", "retest", "discard"]


def test_the_incumbents_drift_changes_the_verdict():
    """A lucky incumbent's re-runs pull its mean up: the same challenger, inconclusive against
    its first runs, is confirmed against all of them."""
    lucky = config([0.955, 0.960, 0.965], first_trial=0)
    assert verdicts([0.952, 0.954], incumbent=lucky) == ["retest", "retest"]
    drifted = config([0.955, 0.960, 0.965, 0.965, 0.970, 0.975], first_trial=0)
    assert verdicts([0.952, 0.954], incumbent=drifted)[-1] == "keep"


def test_more_confidence_needs_more_evidence():
    assert verdicts([0.975, 0.98], judge=NoiseJudge(confidence=0.8)) == ["retest", "keep"]
    assert verdicts([0.975, 0.98, 0.98], judge=NoiseJudge(confidence=0.999)) == \
        ["retest", "retest", "discard"]


def test_unknown_noise_means_more_runs_not_a_guess():
    judge, inc = NoiseJudge(), config([1.0], first_trial=0)
    assert judge.verdict(config([0.5]), inc, None).status == "retest"
    assert judge.verdict(config([0.5, 0.5, 0.5]), inc, None).status == "discard"


def test_the_threshold_judge_believes_one_run():
    judge = ThresholdJudge(min_delta=0.01)
    assert judge.verdict(config([0.985]), INCUMBENT, NOISE).status == "keep"
    assert judge.verdict(config([0.995]), INCUMBENT, NOISE).status == "discard"


def test_the_incumbent_gets_a_re_run_at_the_start_of_each_race_up_to_a_cap():
    judge = NoiseJudge(incumbent_runs=4)
    assert judge.wants_incumbent_run(INCUMBENT, config([0.9], first_trial=10))
    ran_since = config([1.0, 1.01, 0.99], first_trial=0, trials=[0, 1, 2, 11])
    assert not judge.wants_incumbent_run(ran_since, config([0.9], first_trial=10))
    assert not judge.wants_incumbent_run(config([1.0] * 4, first_trial=0), config([0.9]))


def test_a_first_run_far_ahead_is_kept_at_once_and_one_a_hair_ahead_races():
    judge = NoiseJudge(first_confidence=0.99)
    assert verdicts([0.90], judge=judge) == ["keep"]           # ten sigma ahead
    assert verdicts([0.985, 0.985, 0.985], judge=judge)[0] == "retest"  # a sigma and a half
    assert verdicts([0.985, 0.985, 0.985]) == verdicts([0.985, 0.985, 0.985], judge=judge)
    assert verdicts([0.90]) == ["retest"]                        # today's rule: always a repeat
    assert "at once at 99.0%" in judge.describe()
    with pytest.raises(ValueError):
        NoiseJudge(confidence=0.95, first_confidence=0.9)


def test_the_close_rule_re_runs_the_incumbent_only_while_it_could_change_the_verdict():
    judge = NoiseJudge(incumbent_rule="close")
    far = config([0.90], first_trial=10)        # far ahead: one more incumbent run changes nothing
    near = config([0.972], first_trial=10)      # t near the threshold
    assert not judge.wants_incumbent_run(INCUMBENT, far, NOISE)
    assert judge.wants_incumbent_run(INCUMBENT, near, NOISE)
    single = config([1.0], first_trial=0)       # an incumbent kept on one run is re-run
    assert judge.wants_incumbent_run(single, far, NOISE)
    assert NoiseJudge().wants_incumbent_run(INCUMBENT, far, NOISE)  # "race": every race
    with pytest.raises(ValueError):
        NoiseJudge(incumbent_rule="sometimes")


def test_the_seed_fit_finds_luck_shared_across_configs():
    luck = {1: 0.03, 2: -0.01, 3: -0.02}
    means = [1.0, 1.2, 0.9, 1.1]
    tables = [{s: m + luck[s] for s in luck} for m in means]
    tables.append({1: 1.5 + luck[1], 2: 1.5 + luck[2]})    # unbalanced: SEEDs 1-2 only
    effects, std, dof = seed_fit(tables)
    assert {s: round(e, 6) for s, e in effects.items()} == luck  # (luck is centred already)
    assert std == pytest.approx(0.0, abs=1e-9) and dof == 14 - 5 - 3 + 1
    assert seed_fit([{1: 1.0, 2: 1.1}, {3: 1.0, 4: 1.2}]) is None  # no SEED in common


def test_pairing_takes_the_seeds_luck_out_of_the_comparison():
    def on_seeds(values, first_trial=10):
        c = config(values, first_trial)
        c.by_seed = dict(enumerate(values, 1))
        return c
    luck = [0.02, -0.02, 0.0]                       # SEED 1 unlucky, SEED 2 lucky
    incumbent = on_seeds([1.0 + x for x in luck], first_trial=0)
    others = {f"c{i}": on_seeds([m + x + 0.001 * (-1) ** i for x in luck])
              for i, m in enumerate([1.1, 1.3, 0.95, 1.2])}
    configs = {"inc": incumbent, **others}
    noise = noise_floor(configs)
    assert noise.paired_std < noise.std / 5        # most of the spread came with the SEED
    # a challenger 0.01 better on the same two SEEDs: lost in the noise unpaired, clear paired
    challenger = on_seeds([0.99 + luck[0], 0.99 + luck[1]])
    t_unpaired, _ = NoiseJudge().test(challenger, incumbent, noise)
    t_paired, needed = NoiseJudge(paired=True).test(challenger, incumbent, noise)
    assert t_unpaired < 1 and t_paired > needed
    # runs whose SEEDs are unknown (old rows): the unpaired test
    old = config([0.99 + luck[0], 0.99 + luck[1]])
    assert NoiseJudge(paired=True).test(old, incumbent, noise)[0] == pytest.approx(
        NoiseJudge().test(old, incumbent, noise)[0])


# --- races in the driver, with scripted values -----------------------------------------------

class Script:
    """A trainer stand-in returning scripted val_bpb by (MATRIX_LR, SEED): the judge's inputs
    exactly, through the driver's real ask/tell, patching and ledger."""

    def __init__(self, values):
        self.values, self.calls = values, []

    def __call__(self, trial_dir, source, time_limit, data_dir, env, on_line, sandbox=None):
        from autoresearch.patch import read_constants
        c = read_constants(source)
        self.calls.append((c["MATRIX_LR"], c["SEED"]))
        os.makedirs(trial_dir, exist_ok=True)
        with open(os.path.join(trial_dir, "train.py"), "w") as f:
            f.write(source)
        log = os.path.join(trial_dir, "run.log")
        open(log, "w").write("scripted\n")
        value = self.values[(c["MATRIX_LR"], c["SEED"])]
        return Outcome(True, "", {"val_bpb": value, "training_seconds": 1.0}, 0, 0.1, log)


# The race rules these tests script (the noise judge before the replay of real runs chose
# today's defaults): three baseline runs, 95%, a re-run of the incumbent at every race.
RACE = dict(baseline_runs=3, confidence=0.95, drop=0.0, incumbent_rule="race", prune="off")
RACE_FLAGS = ["--baseline-runs", "3", "--confidence", "0.95", "--drop", "0",
              "--incumbent-rule", "race", "--prune", "off"]


@pytest.fixture
def scripted(tmp_path, smoke_data, monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_DATA", smoke_data.dir)
    monkeypatch.chdir(tmp_path)
    shutil.copy(FAKE, tmp_path / "train.py")
    (tmp_path / "search_space.yaml").write_text(
        "smoke:\n  mutate: [1, 1]\n  params:\n    MATRIX_LR: {choices: [0.04, 0.05, 0.06]}\n")

    def make(values, **settings):
        script = Script(values)
        return Driver(Settings(run_fn=script, seed=0, **(RACE | settings)),
                      log=lambda *a: None), script
    return make


VALUES = {(0.04, 42): 1.00, (0.04, 43): 1.01, (0.04, 44): 0.99, (0.04, 45): 1.00,
          (0.05, 42): 0.98, (0.05, 43): 0.995, (0.05, 44): 0.965, (0.06, 42): 1.02}


def race_of(driver, lr):
    """Step until the config with MATRIX_LR lr is decided; the rows written on the way."""
    rows = []
    while not any(r["params"]["MATRIX_LR"] == lr and r["status"] in ("keep", "discard")
                  for r in rows):
        rows.append(driver.step())
        assert len(rows) < 12
    return rows


def test_a_race_in_the_driver(scripted):
    driver, script = scripted(VALUES)
    what = [(r["params"]["MATRIX_LR"], r["seed"], r["status"]) for r in race_of(driver, 0.05)]
    if what[3][0] == 0.06:  # the proposer tried the worse neighbour first
        assert what[3] == (0.06, 42, "discard")
        what = what[:3] + what[4:]
    assert what == [(0.04, 42, "keep"), (0.04, 43, "keep"), (0.04, 44, "keep"),  # the baseline
                    (0.05, 42, "retest"),   # promising: the race starts
                    (0.04, 45, "keep"),     # the incumbent's re-run, once per race
                    (0.05, 43, "retest"),   # mean 0.9875: still short of 95%
                    (0.05, 44, "keep")]     # mean 0.98 over 3 runs: confirmed
    keep = driver.rows[-1]
    assert int(keep["runs"]) == 3 and float(keep["mean_bpb"]) == pytest.approx(0.98)
    assert "MATRIX_LR = 0.05" in open("train.py").read() and "SEED = 42" in open("train.py").read()
    assert len(script.calls) == len(set(script.calls))  # no run repeated


def test_resume_in_the_middle_of_a_race_continues_it(scripted):
    driver, _ = scripted(VALUES)
    while not any(r["status"] == "retest" for r in driver.rows):
        driver.step()
    rows_before = len(driver.rows)
    again, script = scripted(VALUES)  # a restart: everything from results.tsv
    rows = [again.step() for _ in range(3)]
    assert [(r["params"]["MATRIX_LR"], r["seed"]) for r in rows] == \
        [(0.04, 45), (0.05, 43), (0.05, 44)]  # the race goes on exactly where it stood
    assert rows[-1]["status"] == "keep" and len(again.rows) == rows_before + 3


@pytest.mark.slow
def test_resume_after_kill_9_during_a_retest(tmp_path, smoke_data, monkeypatch):
    """kill -9 of loop.py while a challenger's second run trains: on restart the race continues
    with the run that was lost (same SEED, it never finished) and nothing is repeated."""
    monkeypatch.setenv("AUTORESEARCH_DATA", smoke_data.dir)
    shutil.copy(FAKE, tmp_path / "train.py")
    (tmp_path / "search_space.yaml").write_text(
        "smoke:\n  mutate: [1, 1]\n  params:\n    MATRIX_LR: {choices: [0.04, 0.08]}\n")
    set_fake(tmp_path / "train.py", SLEEP=0.6)
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "loop.py"), "--trials", "9", *RACE_FLAGS],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    results = tmp_path / "results.tsv"
    while time.time() < deadline:  # rows: 3 baseline, the challenger (retest), the incumbent
        if results.exists() and len(pd.read_csv(results, sep="\t")) == 5 and \
                (tmp_path / "runs" / "0005" / "run.log").exists():
            break
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    df = pd.read_csv(results, sep="\t")
    assert df.status.tolist() == ["keep"] * 3 + ["retest", "keep"]
    resumed = loop_cli(["--trials", "1", *RACE_FLAGS], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    df = pd.read_csv(results, sep="\t")
    assert df.trial.tolist() == list(range(7))
    lost, last = df.iloc[-2], df.iloc[-1]  # the killed run, recorded on restart, and its re-run
    assert (lost.status, lost.error, lost.config, lost.seed) == ("crash", "lost", df.config[3], 43)
    assert last.config == df.config[3] and last.seed == 43 and last.runs == 2
    assert last.status == "keep" and "retest 2/3" in last.description
    for _, group in df[df.error != "lost"].groupby("config"):
        assert group.seed.is_unique


def test_a_20_column_results_file_resumes(tmp_path, smoke_data, monkeypatch):
    """A file from before the judge (and the study): it is imported into a new study on the first
    start (the original kept as results.tsv.imported) and rewritten as its view, its configs
    come from the runs' own train.py, and with no repeats in it the noise floor is measured
    first, by re-running the incumbent."""
    monkeypatch.setenv("AUTORESEARCH_DATA", smoke_data.dir)
    monkeypatch.chdir(tmp_path)
    shutil.copy(FAKE, tmp_path / "train.py")
    (tmp_path / "search_space.yaml").write_text(FAKE_SPACE)
    driver = Driver(Settings(judge="threshold", baseline_runs=1, grace=30), log=lambda *a: None)
    for t in range(4):
        driver.step()
    old = open("results.tsv").read().splitlines()
    legacy = "".join("\t".join(line.split("\t")[:20]) + "\n" for line in old)
    open("results.tsv", "w").write(legacy)
    driver.close()
    os.remove("results.journal")  # from before the study
    incumbent = driver.incumbent
    resumed = Driver(Settings(grace=30), log=lambda *a: None)
    assert resumed.incumbent.id == incumbent.id and resumed.noise is None
    row = resumed.step()
    assert row["config"] == incumbent.id and row["status"] == "keep"
    assert row["description"].startswith("incumbent re-run 2 (noise floor first)")
    assert open("results.tsv.imported").read() == legacy
    df = pd.read_csv("results.tsv", sep="\t")
    assert list(df.columns[-4:]) == ["config", "runs", "mean_bpb", "worker"] and len(df) == 5
    original = pd.read_csv(io.StringIO("\n".join(old) + "\n"), sep="\t")
    assert df.config.tolist()[:4] == original.config.tolist()  # the same ids, recomputed
    assert df.runs.tolist()[:4] == original.runs.tolist()
