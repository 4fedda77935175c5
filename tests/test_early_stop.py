"""Stopping hopeless runs: the rule on scripted curves, then the loop with a fixture trainer
whose curve says early what its end will be (pruned rows, audits, resume, the report)."""
import dataclasses
import json
import math
import re

import pandas as pd
import pytest

from autoresearch import curves, report
from autoresearch.driver import Driver, LoopError, Settings
from autoresearch.judge import EarlyStop
from autoresearch.ledger import COLUMNS, format_row
from autoresearch.patch import patch_constants
from conftest import FAKE, FAKE_SPACE

CHECKS = curves.CHECKPOINTS


def incumbent_curve(offset=0.0):
    return {p: 3.0 + 2.0 * (1 - p) + offset for p in CHECKS}


def lines(curve):
    """train.py's progress lines for {progress: loss}, every 5% of the budget."""
    points = sorted(curve.items())
    out = []
    for i in range(1, 21):
        p = i / 20
        loss = curves.loss_at(points, p) if p <= points[-1][0] + 0.02 else points[-1][1]
        out.append(f"step {i:05d} | progress {p:.3f} | loss {loss:.4f} | lrm 1.00 | dt 1ms | "
                   f"tok/s 1,000 | mfu 0.0% | epoch 0")
    return out


def feed(watch, text_lines):
    """The progress (0..1) at which the watch asked to stop, or None."""
    for line in text_lines:
        if watch(line):
            return float(re.search(r"progress ([\d.]+)", line).group(1))
    return None


RULE = EarlyStop(start=0.3, sigmas=3.0)
NOISE_AT = {p: 0.01 for p in CHECKS}
REFERENCE = RULE.reference([incumbent_curve(-0.005), incumbent_curve(0.0),
                            incumbent_curve(0.005)], NOISE_AT)


def test_a_clear_loser_is_stopped_at_the_first_safe_checkpoint():
    loser = {p: v + 0.3 for p, v in incumbent_curve().items()}
    watch = RULE.watch(REFERENCE)
    assert feed(watch, lines(loser)) == pytest.approx(0.3)
    assert re.fullmatch(r"pruned at \d+%: loss 4\.7\d\d, incumbent 4\.400 \+- 0\.010 over 3 runs",
                        watch.reason), watch.reason


def test_a_slow_starter_that_ends_ahead_is_not_stopped():
    # far behind before the first safe checkpoint, level at it, ahead at the end
    slow = {p: v + (1.0 if p < 0.3 else 0.02 - 0.1 * (p - 0.3)) for p, v in incumbent_curve().items()}
    watch = RULE.watch(REFERENCE)
    assert feed(watch, lines(slow)) is None
    assert watch.reason == ""


def test_a_run_within_the_noise_is_not_stopped():
    close = {p: v + 0.02 for p, v in incumbent_curve().items()}  # 2 sigma behind at every p
    assert feed(RULE.watch(REFERENCE), lines(close)) is None


def test_an_audit_run_completes_and_says_what_it_escaped():
    loser = {p: v + 0.3 for p, v in incumbent_curve().items()}
    watch = RULE.watch(REFERENCE, audit=True)
    assert feed(watch, lines(loser)) is None
    assert watch.reason.startswith("pruned at 30%")
    assert watch.progress == pytest.approx(1.0)


def test_nothing_is_stopped_before_the_incumbent_has_curves_there():
    loser = {p: v + 0.3 for p, v in incumbent_curve().items()}
    assert RULE.reference([], NOISE_AT) == {}
    assert feed(RULE.watch({}), lines(loser)) is None
    # an incumbent whose curves end at 40%: checked at 30% and 40% only
    short = [{p: v for p, v in incumbent_curve().items() if p <= 0.4}]
    reference = RULE.reference(short, NOISE_AT)
    assert sorted(reference) == [0.3, 0.4]
    # nor where the noise at p is not known yet
    assert RULE.reference([incumbent_curve()], {}) == {}


def test_an_oom_retry_starts_the_watch_afresh():
    level = incumbent_curve()
    watch = RULE.watch(REFERENCE)
    assert feed(watch, lines(level)[:8]) is None      # up to 40%, then the process died
    loser = {p: v + 0.3 for p, v in level.items()}
    assert feed(watch, lines(loser)) == pytest.approx(0.3)  # the retry is checked from 30% on


def test_noise_at_pools_repeats_of_each_config():
    a = [{0.5: 1.0}, {0.5: 1.2}]
    b = [{0.5: 2.0}, {0.5: 2.0}, {0.5: 2.3}]
    std = curves.noise_at([a, b])[0.5]
    expected = ((0.1 ** 2 * 2) + (0.1 ** 2 * 2 + 0.2 ** 2)) / (1 + 2)
    assert std == pytest.approx(expected ** 0.5)
    assert 0.1 not in curves.noise_at([a, b])


# --- the loop ---------------------------------------------------------------------------------

@pytest.fixture
def work(tmp_path, smoke_data, monkeypatch):
    """The fixture trainer with a curve that foretells its val_bpb, slow enough after 50% that
    the loop can stop it."""
    monkeypatch.setenv("AUTORESEARCH_DATA", smoke_data.dir)
    monkeypatch.chdir(tmp_path)
    # at the optimum's learning rate, so most of greedy's moves are losers to stop
    source = patch_constants(open(FAKE).read(), {"CURVE": "target", "SLEEP": 1.0, "MATRIX_LR": 0.08})
    (tmp_path / "train.py").write_text(source)
    (tmp_path / "search_space.yaml").write_text(FAKE_SPACE)
    return tmp_path


def true_value(params):
    return 1.0 + (math.log(params["MATRIX_LR"]) - math.log(0.08)) ** 2 + 0.01 * params["DEPTH"]


def driver(**options):
    return Driver(Settings(**{"strategy": "greedy", "seed": 3, "prune": "on", "audit": 0.0,
                              **options}),
                  log=lambda *a: None)


def test_the_loop_stops_losers_and_records_them_as_pruned_rows(work):
    d = driver()
    d.run(trials=9, progress=False)
    df = pd.read_csv("results.tsv", sep="\t")
    pruned = df[df.status == "pruned"]
    assert len(pruned) >= 1, df[["trial", "status", "val_bpb", "description"]]
    for row in pruned.itertuples():
        assert re.fullmatch(r"pruned at \d+%: loss [\d.]+, incumbent [\d.]+ \+- [\d.]+ over \d+ runs?",
                            row.error), row.error
        assert row.val_bpb == 0 and row.mean_bpb == 0
        assert 0 < row.training_seconds < d.budget
        # every stop was right: the fixture's curve foretells its value exactly
        incumbent = df[(df.status == "keep") & (df.trial < row.trial)].iloc[-1]
        assert true_value(json.loads(row.params)) > true_value(json.loads(incumbent.params))
    # the baseline's and the incumbent's runs are never stopped
    assert set(df[df.strategy == "baseline"].status) == {"keep"}
    # a pruned config is not proposed again, and a restart reads the pruned rows
    assert pruned.config.is_unique
    again = driver()
    assert set(pruned.config) <= {c.id for c in again.configs.values() if c.status == "pruned"}
    for config in pruned.config:
        assert "pruned" in again.candidates.cannot_run(again.configs[config].params, again.standing)
    again.run(trials=2, progress=False)
    after = pd.read_csv("results.tsv", sep="\t")
    assert len(after) == len(df) + 2
    summary = report.summarize(report.load_results("results.tsv"))
    assert summary["pruned"] == after[after.status == "pruned"].config.nunique()
    assert summary["pruning"]["pruned"] == (after.status == "pruned").sum()
    assert summary["pruning"]["saved_seconds"] > 0
    assert "pruned:" in report.format_summary(summary)


def test_a_races_re_runs_are_spared_unless_asked(work):
    d = driver()
    d.run(trials=6, progress=False)
    other = next(c for c in d.configs.values() if c.id != d.incumbent.id and c.n)
    rerun = d.schedule.rerun_job(other, "retest", d.standing)
    def watch(job):
        return d.stopping.watch(job, 100, d.runs, d.configs, d.incumbent)
    assert watch(rerun) is None
    assert watch(dataclasses.replace(rerun, purpose="new")) is not None
    d.s.prune_reruns = True
    assert watch(rerun) is not None


def test_audited_runs_finish_and_the_report_counts_their_keeps(work):
    d = driver(audit=0.99)
    d.run(trials=9, progress=False)
    df = pd.read_csv("results.tsv", sep="\t")
    audited = df[df.description.str.contains("audit: would have been pruned at")]
    assert len(audited) >= 1 and "pruned" not in set(df.status)
    assert (audited.val_bpb > 0).all()
    summary = report.summarize(report.load_results("results.tsv"))
    p = summary["pruning"]
    assert p["audited"] == len(audited) and p["pruned"] == 0
    kept = {c for c in audited.config if (df[df.config == c].status == "keep").any()}
    assert p["audited_kept"] == len(kept)
    assert "audit:" in report.format_summary(summary)


def test_prune_off_never_stops_a_run(work):
    d = Driver(Settings(strategy="greedy", seed=3, prune="off"), log=lambda *a: None)
    d.run(trials=6, progress=False)
    df = pd.read_csv("results.tsv", sep="\t")
    assert "pruned" not in set(df.status)
    assert not df.description.str.contains("audit").any()


def test_bad_prune_settings_are_clear_errors(work):
    with pytest.raises(LoopError, match="prune must be on or off"):
        Driver(Settings(prune="maybe"), log=lambda *a: None)
    with pytest.raises(LoopError, match="audit"):
        Driver(Settings(prune="on", audit=1.5), log=lambda *a: None)


def test_old_results_without_pruned_rows_still_load(tmp_path):
    rows = [
        {"commit": "a", "val_bpb": 1.5, "memory_gb": 0.1, "status": "keep", "description": "baseline",
         "trial": 0, "strategy": "baseline", "params": "{\"MATRIX_LR\": 0.04}", "config": "c0",
         "runs": 1, "mean_bpb": 1.5},
        {"commit": "b", "val_bpb": 0.0, "memory_gb": 0.0, "status": "pruned", "description": "greedy",
         "trial": 1, "strategy": "greedy", "params": "{\"MATRIX_LR\": 0.02}", "config": "c1",
         "error": "pruned at 30%: loss 4.1, incumbent 3.9 +- 0.01 over 1 run",
         "training_seconds": 3.0, "runs": 0, "mean_bpb": 0.0},
    ]
    path = tmp_path / "results.tsv"
    path.write_text("\t".join(COLUMNS) + "\n" + "".join(format_row(r) for r in rows))
    s = report.summarize(report.load_results(str(path)))
    assert s["pruned"] == 1 and s["pruning"]["pruned"] == 1


def test_the_rule_as_an_optuna_pruner_on_a_real_study():
    import optuna
    from autoresearch.pruner import EarlyStopPruner
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(pruner=EarlyStopPruner(RULE))

    def run(offset, config, incumbent=False, stop_early=True):
        trial = study.ask()
        trial.set_user_attr("config", config)
        trial.set_user_attr("incumbent", incumbent)
        for p, loss in sorted(incumbent_curve(offset).items()):
            trial.report(loss, step=round(100 * p))
            if stop_early and trial.should_prune():
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                return round(100 * p)
        study.tell(trial, 1.0 + offset)
        return None

    assert run(0.3, "loser") is None          # no incumbent curves yet: nothing is stopped
    for offset in (-0.01, 0.0, 0.01):
        assert run(offset, "base", incumbent=True) is None
    assert run(0.3, "loser2") == 30           # at the first safe checkpoint
    assert run(0.02, "close") is None         # within the noise
    assert run(-0.2, "better") is None
    states = [t.state for t in study.trials]
    assert states.count(optuna.trial.TrialState.PRUNED) == 1
