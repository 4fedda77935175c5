"""The night's prior (prior.py): the challengers' first runs read from the results, the prior
fitted to them, and the judge asking for evidence in proportion to what the night shows."""
import numpy as np
import pytest
from scipy import stats

from autoresearch import history
from autoresearch.judge import NoiseJudge, noise_floor
from autoresearch.prior import MIN_GAPS, Gap, Prior, gaps, widened


def run(trial, config, value, status="discard", kind="params"):
    return history.Run(trial, status, value if status in history.FINISHED else None, {}, config,
                       trial, "greedy", kind, "", "", None, {})


def night(first_runs, incumbent=(2.00, 2.02), start=0):
    """A baseline kept over its runs, then challengers' first runs, all discarded."""
    runs = [run(start + i, "base", v, "keep", "baseline") for i, v in enumerate(incumbent)]
    for i, v in enumerate(first_runs):
        runs.append(run(start + len(incumbent) + i, f"c{i}", v,
                        "pruned" if v is None else "discard"))
    return runs


def test_gaps_are_taken_against_the_incumbent_of_their_time():
    runs = night([1.95, 2.10])
    runs += [run(4, "c0", 1.97, "keep"),          # c0's race ends in a keep
             run(5, "c2", 1.90), run(6, "c2", 1.92, "retest"),  # its re-run is no first run
             run(7, "c3", None, "pruned"), run(8, "c4", 2.0, kind="recheck")]
    got = gaps(runs, window=0)
    assert [g.incumbent_runs for g in got] == [2, 2, 2, 2]
    assert [round(g.value, 6) if g.value is not None else None for g in got] == \
        [0.06, -0.09, 0.06, None]   # 2.01 - 1.95, 2.01 - 2.10, 1.96 - 1.90; c3 stopped
    assert len(gaps(runs, exclude="c2", window=0)) == 3
    assert [g.value for g in gaps(runs, window=2)] == [got[2].value, None]


def test_the_prior_follows_the_share_of_challengers_ahead():
    rich = [Gap(v, 2) for v in (0.12, 0.15, 0.10, -0.05, 0.13, -0.20, 0.11, 0.14)]
    poor = [Gap(v, 2) for v in (-0.02, 0.01, -0.05, None, -0.08, 0.02, None, -0.03)]
    std = 0.04
    rich_prior, poor_prior = Prior.fit(rich, std), Prior.fit(poor, std)
    assert rich_prior.share_ahead() > 0.6 > 0.4 > poor_prior.share_ahead()
    # one run 0.09 ahead of an incumbent over two: likely real in a rich night, likely luck
    # in a poor one (the t-test says the same of both)
    se = std * (1 + 1 / 2) ** 0.5
    assert rich_prior.ahead(0.09, se)[0] > 0.9
    assert poor_prior.ahead(0.09, se)[0] < 0.8
    # more evidence moves the posterior in the poor night too
    assert poor_prior.ahead(0.09, std * (1 / 3 + 1 / 2) ** 0.5)[0] > \
        poor_prior.ahead(0.09, se)[0]


@pytest.mark.parametrize("dof", [1, 3, 30])
def test_under_a_flat_prior_the_verdict_is_the_t_tests(dof):
    flat = Prior(np.linspace(-2, 2, 4000), np.full(4000, 1 / 4000))
    se = 0.02
    at_the_line = stats.t.ppf(0.9, dof) * se    # where the t-test says 90%
    p, _ = flat.ahead(at_the_line, widened(se, dof, 0.9))
    assert p == pytest.approx(0.9, abs=0.002)


def test_a_run_far_ahead_is_believed_even_in_a_poor_night():
    """Few repeats behind the noise floor (dof 1) must not hand a run many sigma ahead back to
    a prior that says most challengers lose."""
    poor = [Gap(v, 2) for v in (-0.02, None, -0.05, None, -0.08, 0.01)]
    std = widened(0.015, 1, 0.9)
    p, _ = Prior.fit(poor, std).ahead(0.17, std * (1 + 1 / 2) ** 0.5)
    assert p > 0.95


def configs_of(values):
    out = {}
    for name, vals in values.items():
        c = history.Config(name, {}, "params", "greedy", "", 0, status="retest")
        c.values = list(vals)
        c.trials = list(range(len(vals)))
        out[name] = c
    return out


@pytest.mark.parametrize("phase", ["rich", "poor"])
def test_the_judge_keeps_one_run_in_a_rich_night_and_races_it_in_a_poor_one(phase):
    firsts = [1.88, 1.86, 1.90, 2.05, 1.87] if phase == "rich" else [2.02, 2.05, 1.99, None, 2.04]
    runs = night(firsts) + [run(10, "x", 1.92)]
    configs = configs_of({"base": [2.00, 2.02], "x": [1.92]})
    judge = NoiseJudge(confidence=0.9, min_runs=1, drop=0.5, prior="night")
    verdict = judge.verdict(configs["x"], configs["base"], noise_floor(configs), runs)
    assert "under the night's prior" in verdict.reason
    assert verdict.status == ("keep" if phase == "rich" else "retest")


def test_too_few_challengers_leave_the_t_test_in_charge():
    runs = night([1.88] * (MIN_GAPS - 1)) + [run(10, "x", 1.92)]
    configs = configs_of({"base": [2.00, 2.02], "x": [1.92]})
    judge = NoiseJudge(confidence=0.9, drop=0.5, prior="night")
    flat = NoiseJudge(confidence=0.9, drop=0.5)
    noise = noise_floor(configs)
    assert judge.verdict(configs["x"], configs["base"], noise, runs) == \
        flat.verdict(configs["x"], configs["base"], noise, runs)


def test_bad_prior_settings_are_refused():
    with pytest.raises(ValueError, match="prior must be"):
        NoiseJudge(prior="nightly")
    with pytest.raises(ValueError, match="window"):
        NoiseJudge(prior="night", window=MIN_GAPS - 1)
