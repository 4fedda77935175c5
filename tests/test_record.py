"""One record: every run of the loop is a trial of the study beside results.tsv (the journal
file), with its curve as intermediate values and its details as user attributes; results.tsv is
its view; an older results.tsv is imported keeping its trial numbers; a copied results directory
goes on; Optuna's own pruners can stop runs over the study's curves."""
import json
import os
import shutil

import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

from autoresearch import ledger, protocol
from autoresearch.driver import Driver, Settings
from autoresearch.patch import patch_constants
from autoresearch.storage import open_storage, study_location
from conftest import FAKE, FAKE_SPACE


@pytest.fixture
def work(tmp_path, smoke_data, monkeypatch):
    """The fixture trainer, with a curve that foretells its val_bpb (so runs can be stopped)."""
    monkeypatch.setenv("AUTORESEARCH_DATA", smoke_data.dir)
    monkeypatch.chdir(tmp_path)
    source = patch_constants(open(FAKE).read(), {"CURVE": "target", "SLEEP": 0.3,
                                                 "MATRIX_LR": 0.08})
    (tmp_path / "train.py").write_text(source)
    (tmp_path / "search_space.yaml").write_text(FAKE_SPACE)
    return tmp_path


def driver(**options):
    return Driver(Settings(**{"strategy": "greedy", "seed": 3, "audit": 0.0, **options}),
                  log=lambda *a: None)


def study_trials(results="results.tsv"):
    storage = open_storage(study_location(results))
    study = optuna.load_study(study_name="autoresearch", storage=storage)
    return study.get_trials(deepcopy=False)


def test_every_run_is_a_trial_with_its_curve_and_details(work):
    d = driver()
    d.run(trials=8, progress=False)
    d.close()
    assert (work / "results.journal").exists()
    df = pd.read_csv("results.tsv", sep="\t")
    trials = {t.number: t for t in study_trials()}
    assert sorted(trials) == df.trial.tolist()
    states = {"keep": TrialState.COMPLETE, "discard": TrialState.COMPLETE,
              "retest": TrialState.COMPLETE, "pruned": TrialState.PRUNED,
              "crash": TrialState.FAIL}
    assert "pruned" in set(df.status)  # the fixture's losers are stopped
    for row in df.itertuples():
        t = trials[row.trial]
        assert t.state == states[row.status], (row.trial, row.status, t.state)
        if t.state == TrialState.COMPLETE:
            assert t.value == pytest.approx(row.val_bpb, abs=1e-6)
        # the curve: a point every 2% of the budget, interpolated between progress lines
        steps = sorted(t.intermediate_values)
        assert steps and all(0 < s <= 100 and s % 2 == 0 for s in steps), steps
        logged = [protocol.progress_of(line) for line in open(work / row.log)]
        logged = [(p, loss) for _, p, loss in filter(None, logged)]
        for step, value in t.intermediate_values.items():
            below = max((pl for pl in logged if pl[0] <= step / 100 + 1e-9), default=None)
            above = min((pl for pl in logged if pl[0] >= step / 100 - 1e-9), default=None)
            assert below and above and min(below[1], above[1]) - 1e-9 <= value \
                <= max(below[1], above[1]) + 1e-9, (step, value, below, above)
        if row.status == "pruned":  # nothing after the stop; its value its curve's last point
            assert steps[-1] <= int(row.error.split("%")[0].split()[-1]) + 2, (steps, row.error)
            assert t.value == t.intermediate_values[steps[-1]]
        else:
            assert steps[-1] == 100 and t.intermediate_values[100] == pytest.approx(logged[-1][1])
        # what a person opens: the verdict, the log's tail, the change against the baseline
        assert t.user_attrs["row"]["trial"] == row.trial
        assert t.user_attrs["log_tail"] and t.user_attrs["log_tail"] in open(work / row.log).read()
        assert t.user_attrs["purpose"] in ("baseline", "incumbent", "retest", "new")
        assert isinstance(t.user_attrs["verdict"], str)
        if row.strategy != "baseline":
            changed = json.loads(row.changes)
            assert all(f"+{name} = " in t.user_attrs["diff"] for name in changed), \
                (changed, t.user_attrs["diff"])
        # the searched constants as Optuna params: the dashboard plots them
        assert set(t.params) == {"MATRIX_LR", "DEPTH", "DEVICE_BATCH_SIZE"}


def test_an_older_results_tsv_is_imported_keeping_its_trial_numbers(work):
    d = driver(prune="off")
    d.run(trials=4, progress=False)
    d.close()
    before = open("results.tsv").read()
    old = pd.read_csv("results.tsv", sep="\t")
    # as a results.tsv from before the study: one trial missing (a gap) and no journal
    lines = before.splitlines(keepends=True)
    gap = lines[0] + "".join(lines[1:3]) + "".join(lines[4:])
    open("results.tsv", "w").write(gap)
    os.remove("results.journal")
    messages = []
    resumed = Driver(Settings(strategy="greedy", seed=3), log=messages.append)
    assert any("started from the 3 run(s)" in m for m in messages), messages
    assert open("results.tsv.imported").read() == gap
    row = resumed.step()
    assert row["trial"] == 4  # never a number the old file used, nor its gap
    resumed.close()
    df = pd.read_csv("results.tsv", sep="\t")
    assert df.trial.tolist() == [0, 1, 3, 4]
    pd.testing.assert_frame_equal(df.iloc[:3].reset_index(drop=True),
                                  old[old.trial != 2].reset_index(drop=True))
    trials = {t.number: t for t in study_trials()}
    # the curve of an imported run, read from its log onto the steps live runs report
    assert trials[3].intermediate_values and all(
        s % 2 == 0 for s in trials[3].intermediate_values)
    assert trials[3].intermediate_values.keys() == trials[4].intermediate_values.keys()
    assert trials[2].state == TrialState.FAIL and "withdrawn" in trials[2].user_attrs


def test_a_copied_results_directory_goes_on_elsewhere(work, tmp_path_factory):
    d = driver(prune="off")
    d.run(trials=3, progress=False)
    d.close()
    elsewhere = tmp_path_factory.mktemp("elsewhere") / "copy"
    shutil.copytree(work, elsewhere)
    os.chdir(elsewhere)
    again = driver(prune="off")
    assert len(again.rows) == 3 and again.incumbent is not None
    row = again.step()
    again.close()
    assert row["trial"] == 3
    assert len(pd.read_csv(elsewhere / "results.tsv", sep="\t")) == 4
    assert len(pd.read_csv(work / "results.tsv", sep="\t")) == 3  # the original untouched


def test_results_tsv_is_the_view_and_is_rewritten_if_deleted(work):
    d = driver(prune="off")
    d.run(trials=3, progress=False)
    view = open("results.tsv").read()
    os.remove("results.tsv")
    d.run(trials=1, progress=False)
    d.close()
    again = open("results.tsv").read()
    assert again.startswith(view) and len(again.splitlines()) == 5
    assert again.splitlines()[0].split("\t") == ledger.COLUMNS


@pytest.mark.parametrize("pruner", ["median", "wilcoxon"])
def test_optunas_pruners_can_stop_runs_instead(work, pruner):
    d = driver(prune=pruner, max_runs=2)
    d.run(trials=12, progress=False)
    d.close()
    df = pd.read_csv("results.tsv", sep="\t")
    pruned = df[df.status == "pruned"]
    assert len(pruned) >= 1, df[["trial", "status", "val_bpb"]]
    assert pruned.error.str.contains(f"by Optuna's {pruner} pruner").all()
    assert set(df[df.strategy == "baseline"].status) == {"keep"}  # never the baseline
    trials = {t.number: t for t in study_trials()}
    assert all(trials[t].state == TrialState.PRUNED for t in pruned.trial)
