"""Model-based strategies (Optuna TPE and CMA-ES) on a cheap objective, and on resume."""
import json
import math
import shutil

import pandas as pd
import pytest

from autoresearch.driver import Driver, Settings
from autoresearch.proposers import make_proposer
from autoresearch.space import parse_space
from test_loop import FAKE, FAKE_SPACE, SEARCHED, searched, set_fake  # noqa: F401

CONSTANTS = {"LR": 0.01, "WD": 0.5, "DEPTH": 2, "PATTERN": "L", "BATCH": 16, "TOTAL": 4096,
             "MAX_SEQ_LEN": 64}
SPACE = parse_space({"params": {
    "LR": {"low": 0.001, "high": 1.0, "log": True},
    "WD": {"low": 0.0, "high": 1.0},
    "DEPTH": {"low": 1, "high": 12, "int": True},
    "PATTERN": {"choices": ["L", "SL", "SSL"]},
    "BATCH": {"choices": [8, 16, 32, 64]},
}, "constraints": ["TOTAL % (BATCH * MAX_SEQ_LEN) == 0"]}, "p", CONSTANTS)


def objective(p):
    return (1 + (math.log10(p["LR"]) + 1.3) ** 2 + (p["WD"] - 0.3) ** 2 + 0.02 * (p["DEPTH"] - 7) ** 2
            + 0.3 * (p["PATTERN"] != "SSL") + 0.1 * (p["BATCH"] != 32))


def search(name, n=60, seed=0):
    proposer = make_proposer(name, SPACE, seed)
    best_params = {k: CONSTANTS[k] for k in SPACE.params}
    best = math.inf
    for _ in range(n):
        cand = proposer.propose(best_params, [])
        if SPACE.violations(CONSTANTS | cand.params):
            proposer.reject(cand)
            continue
        value = objective(cand.params)
        proposer.tell(cand, {"status": "discard", "val_bpb": f"{value:.6f}"})
        if value < best:
            best, best_params = value, cand.params
    return best


def test_model_based_strategies_beat_random_search():
    random_best = [search("random", seed=s) for s in range(3)]
    for name in ("tpe", "cmaes"):
        best = [search(name, seed=s) for s in range(3)]
        assert sum(best) / 3 < sum(random_best) / 3, (name, best, random_best)
        assert min(best) < 1.15  # near the optimum of 1.0


def test_crashes_and_constraint_breakers_are_failed_trials():
    proposer = make_proposer("tpe", SPACE, 0)
    base = {k: CONSTANTS[k] for k in SPACE.params}
    cand = proposer.propose(base, [])
    proposer.tell(cand, {"status": "crash", "val_bpb": "0.000000"})
    proposer.reject(proposer.propose(base, []))
    states = [t.state.name for t in proposer.study.trials]
    assert states == ["FAIL", "FAIL"]


@pytest.mark.parametrize("strategy", ["tpe", "cmaes"])
def test_resume_feeds_the_history_to_the_study(strategy, tmp_path, smoke_data, monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_DATA", smoke_data.dir)
    monkeypatch.chdir(tmp_path)
    shutil.copy(FAKE, tmp_path / "train.py")
    (tmp_path / "search_space.yaml").write_text(FAKE_SPACE)
    first = Driver(Settings(strategy=strategy, grace=30), log=lambda *a: None)
    for trial in range(5):
        first.step(trial)
    rows = first.rows
    second = Driver(Settings(strategy=strategy, seed=1, grace=30), log=lambda *a: None)
    for trial in range(5, 9):
        second.step(trial)
    study = second.proposer.study
    told = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(told) >= len(rows) + 4 - 1  # the five old rows (within the space) and the new ones
    old_values = sorted(float(r["val_bpb"]) for r in rows if r["status"] != "crash")
    assert sorted(t.value for t in told[:len(old_values)]) == pytest.approx(old_values)
    df = pd.read_csv("results.tsv", sep="\t")
    assert len(df) == 9 and df.trial.tolist() == list(range(9))
    assert len({json.dumps(json.loads(p), sort_keys=True) for p in df.params}) == 9  # no re-runs
    assert set(df.strategy[1:]) == {strategy}
