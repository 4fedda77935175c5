"""Model-based strategies (Optuna TPE and CMA-ES) on a cheap objective, and on resume."""
import math
import shutil

import pandas as pd
import pytest

from autoresearch.driver import Driver, Settings
from autoresearch.history import Config
from autoresearch.proposers import Context, make_proposer
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


def context(best):
    return Context(best=best, best_value=None, best_runs=0, configs={}, noise=None, source="",
                   defaults={}, check=lambda params, source=None: None)


def decided(params, value, status="discard"):
    c = Config("x", params, "params", "test", "", 0, status=status)
    if value is not None:
        c.values.append(value)
    return c


def search(name, n=60, seed=0):
    proposer = make_proposer(name, SPACE, seed)
    best_params = {k: CONSTANTS[k] for k in SPACE.params}
    best = math.inf
    proposer.warm_start(context(best_params))
    for _ in range(n):
        cand = proposer.propose(context(best_params))
        if SPACE.violations(CONSTANTS | cand.params):
            proposer.reject(cand)
            continue
        value = objective(cand.params)
        proposer.tell(cand, decided(cand.params, value))
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
    cand = proposer.propose(context(base))
    proposer.tell(cand, decided(cand.params, None, "crash"))
    proposer.reject(proposer.propose(context(base)))
    states = [t.state.name for t in proposer.study.trials]
    assert states == ["FAIL", "FAIL"]


@pytest.mark.parametrize("strategy", ["tpe", "cmaes"])
def test_resume_feeds_config_means_to_the_study(strategy, tmp_path, smoke_data, monkeypatch):
    """What the study learns is each config's mean over its runs, told once its race is
    decided; on resume the decided configs are added, and the runs go on without repeats."""
    monkeypatch.setenv("AUTORESEARCH_DATA", smoke_data.dir)
    monkeypatch.chdir(tmp_path)
    shutil.copy(FAKE, tmp_path / "train.py")
    (tmp_path / "search_space.yaml").write_text(FAKE_SPACE)
    set_fake("train.py", NOISE=0.01)
    first = Driver(Settings(strategy=strategy, grace=30), log=lambda *a: None)
    for trial in range(8):
        first.step()
    decided_before = {c.id: c for c in first.configs.values() if c.status in ("keep", "discard")}
    second = Driver(Settings(strategy=strategy, seed=1, grace=30), log=lambda *a: None)
    for trial in range(8, 14):
        second.step()
    study = second.proposer.study
    told = sorted(t.value for t in study.trials if t.state.name == "COMPLETE")
    for c in decided_before.values():  # the means, not single runs
        assert any(abs(v - c.mean) < 1e-9 for v in told), (c.mean, told)
    baseline = next(c for c in decided_before.values() if c.kind == "baseline")
    assert baseline.n >= Settings().baseline_runs and not any(abs(v - x) < 1e-9 for v in told for x in baseline.values)
    df = pd.read_csv("results.tsv", sep="\t")
    assert len(df) == 14 and df.trial.tolist() == list(range(14))
    for config, group in df.groupby("config"):
        assert group.params.nunique() == 1 and group.seed.is_unique  # re-runs, never repeats
    assert strategy in set(df.strategy[3:]) <= {strategy, "baseline"}  # (incumbent re-runs)


def test_tpe_counts_configs_running_elsewhere_until_their_verdict():
    """constant_liar: another worker's running config is a RUNNING trial of the study, and gets
    the config's mean when its race is decided (told once, not added again)."""
    proposer = make_proposer("tpe", SPACE, 0)
    base = {k: CONSTANTS[k] for k in SPACE.params}
    other = dict(base, LR=0.5)
    ctx = context(base)
    ctx.running = [{"config": "elsewhere", "params": other}]
    proposer.propose(ctx)
    proposer.propose(ctx)  # asked again: still one stand-in
    states = [t.state.name for t in proposer.study.trials]
    assert states.count("RUNNING") == 3 and proposer.liars == {"elsewhere": 0}
    c = decided(other, 1.234)
    c.id = "elsewhere"
    proposer.tell(None, c)
    first = proposer.study.trials[0]
    assert first.state.name == "COMPLETE" and first.value == 1.234 and not proposer.liars
    assert len(proposer.study.trials) == 3
