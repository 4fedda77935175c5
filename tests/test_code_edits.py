"""Code mode (--llm-scope code): the LLM's search/replace edits to train.py, through the real
openai client and a scripted server on 127.0.0.1, run by the loop from each trial's own copy."""
import json
import os
import shutil

import pandas as pd
import pytest

from autoresearch import edits
from autoresearch.memory import oom_observations
from autoresearch.space import parse_space
from conftest import ROOT, SECRET, FakeLLM
from test_loop import loop_cli

REAL = open(os.path.join(ROOT, "train.py")).read()
REAL_SPACE = parse_space({"params": {"MATRIX_LR": {"low": 0.01, "high": 0.1, "log": True},
                                     "DEPTH": {"choices": [1, 2, 3]}}}, "smoke",
                         {"MATRIX_LR": 0.04, "DEPTH": 2})


def edit(search, replace, rationale="try it"):
    return json.dumps({"edits": [{"search": search, "replace": replace}], "rationale": rationale})


# --- applying and checking edits -------------------------------------------------------------

def test_search_text_must_occur_exactly_once():
    assert edits.apply_edits("a = 1\nb = 2\n", [{"search": "b = 2", "replace": "b = 3"}]) == "a = 1\nb = 3\n"
    with pytest.raises(edits.EditError, match="does not occur"):
        edits.apply_edits("a = 1\n", [{"search": "c = 1", "replace": ""}])
    with pytest.raises(edits.EditError, match="occurs 2 times"):
        edits.apply_edits("x\nx\n", [{"search": "x", "replace": "y"}])
    with pytest.raises(edits.EditError, match="empty search"):
        edits.apply_edits("x\n", [{"search": "  ", "replace": "y"}])
    with pytest.raises(edits.EditError, match="non-empty list"):
        edits.apply_edits("x\n", {"search": "x", "replace": "y"})


def check_real(search, replace):
    new = edits.apply_edits(REAL, [{"search": search, "replace": replace}])
    return edits.check_edited(new, REAL, REAL_SPACE, {"MATRIX_LR": 0.04, "DEPTH": 2})


def test_an_edit_to_the_model_passes_and_reports_the_constants():
    params = check_real("softcap=15.0", "softcap=20.0")
    assert params == {"MATRIX_LR": 0.04, "DEPTH": 2}
    assert check_real("DEPTH = None", "DEPTH = 3")["DEPTH"] == 3


@pytest.mark.parametrize("search,replace,message", [
    ("TIME_BUDGET = float(", "TIME_BUDGET = 2 * float(", "is fixed"),
    ("MAX_SEQ_LEN = PROFILE.max_seq_len", "MAX_SEQ_LEN = 64", "is fixed"),
    ("val_bpb = data.evaluate_bpb(model, DEVICE_BATCH_SIZE)",
     "val_bpb = data.evaluate_bpb(model, DEVICE_BATCH_SIZE) * 0.9", "is fixed"),
    ("    t_end = time.time()\n", "    t_end = time.time()\n    val_bpb = val_bpb - 0.1\n",
     "val_bpb must come from evaluate_bpb"),
    ('    print(f"num_steps:        {step}")\n', "", "missing: num_steps"),
    ("DEPTH = None ", "DEPTH = 7 ", "DEPTH=7 is outside the search space"),
    ("MATRIX_LR = None", "MATRIX_LR = 0.02 * 2", None),
    ("MATRIX_LR = None", "MATRIX_LR = float('0.04')", "one literal per constant"),
    ("def norm(x):", "def norm(x)", "does not parse"),
])
def test_edits_that_break_the_contract_are_refused(search, replace, message):
    if message is None:  # arithmetic on literals is still a literal the loop can patch
        assert check_real(search, replace)["MATRIX_LR"] == 0.04
        return
    with pytest.raises(edits.EditError, match=message):
        check_real(search, replace)


def test_contract_violation_after_the_run():
    assert edits.contract_violation({"training_seconds": 61.0, "profile": "cpu"}, 60, "cpu") is None
    assert "past the 60s budget" in edits.contract_violation({"training_seconds": 90.0}, 60, "cpu")
    assert "profile 'smoke'" in edits.contract_violation({"training_seconds": 1.0, "profile": "smoke"}, 60, "cpu")


# --- the loop in code mode ---------------------------------------------------------------------

@pytest.fixture
def code_work(fake_llm_work):
    return fake_llm_work(timeout=2.0, max_retries=0, scope="code")


def test_kept_edits_accumulate_in_train_py(code_work):
    driver, fake, work = code_work
    base = open("train.py").read()
    fake.script = [edit("+ 0.01 * DEPTH", "+ 0.001 * DEPTH", "a smaller depth penalty"),
                   edit("MATRIX_LR = 0.04 ", "MATRIX_LR = 0.08 ", "toward the optimum")]
    row = driver.step()
    assert row["description"].startswith("llm code: a smaller depth penalty (+1 -1 lines) [120 tokens, ")
    assert row["status"] == "keep" and row["changes"] == {}
    trial_py = open(work / "runs" / "0001" / "train.py").read()
    assert open("train.py").read() == trial_py != base  # the keep replaced train.py whole
    diff = open(work / "runs" / "0001" / "edit.diff").read()
    assert "-val_bpb = 1.0" in diff and "+val_bpb = 1.0" in diff and "0.001 * DEPTH" in diff
    row = driver.step()
    assert row["status"] == "keep" and row["changes"] == {"MATRIX_LR": 0.08}
    now = open("train.py").read()
    assert "0.001 * DEPTH" in now and "MATRIX_LR = 0.08 " in now  # both edits, nothing reset
    request = fake.requests[1]["body"]
    assert request["response_format"]["json_schema"]["schema"]["required"] == ["edits", "rationale"]
    prompt = request["messages"][1]["content"]
    assert "0.001 * DEPTH" in prompt and "a smaller depth penalty" in prompt  # the best file and history
    df = pd.read_csv(work / "results.tsv", sep="\t")
    assert df.strategy.tolist() == ["baseline", "llm-code", "llm-code"]


def test_unusable_edits_get_a_repair_round_then_fall_back(code_work):
    driver, fake, work = code_work
    fake.script = [edit("no such text", "x"), edit('print("---")', 'print("===")')]
    row = driver.step()
    assert row["description"].startswith("llm fallback (the summary block must stay")
    assert "does not occur" in fake.requests[1]["body"]["messages"][-1]["content"]
    assert not os.path.exists(work / "runs" / "0001" / "edit.diff")  # the greedy step ran instead


def test_a_repeated_edit_is_refused(code_work):
    driver, fake, work = code_work
    change = edit("+ 0.01 * DEPTH", "+ 0.02 * DEPTH")
    fake.script = [change, change, edit("+ 0.01 * DEPTH", "+ 0.03 * DEPTH")]
    assert driver.step()["status"] == "discard"
    row = driver.step()
    assert row["description"].startswith("llm code:") and "0.03 * DEPTH" in \
        open(work / "runs" / "0002" / "edit.diff").read()
    assert "tried already" in fake.requests[2]["body"]["messages"][-1]["content"]


def test_a_summary_past_the_budget_is_a_crash_not_a_keep(code_work):
    driver, fake, work = code_work
    best = open("train.py").read()
    fake.script = [json.dumps({"rationale": "train longer", "edits": [
        {"search": 'print("training_seconds: 1.0")', "replace": 'print("training_seconds: 99.0")'},
        {"search": "+ 0.01 * DEPTH", "replace": "- 0.5"}]})]
    row = driver.step()  # the edit also scores far better: the guard must hold all the same
    assert row["status"] == "crash" and row["error"] == "error: contract: trained 99.0s, past the 5s budget"
    assert open("train.py").read() == best


def test_an_edit_that_runs_out_of_memory_teaches_nothing_about_sizes(code_work):
    driver, fake, work = code_work
    fake.script = [edit('BEHAVIOUR = "ok"', 'BEHAVIOUR = "oom_above_4"', "a memory-hungry idea")]
    row = driver.step()
    assert "oom retry: DEVICE_BATCH_SIZE 16->4" in row["description"]
    assert row["params"]["DEVICE_BATCH_SIZE"] == 4 and row["status"] == "discard"
    assert 'BEHAVIOUR = "oom_above_4"' in open(work / "runs" / "0001" / "train.py").read()
    assert oom_observations(driver.runs) == []  # the base code at 16 is not predicted to fail


@pytest.mark.slow
def test_code_mode_on_the_real_train_py(tmp_path, smoke_data, monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_DATA", smoke_data.dir)
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.chdir(tmp_path)
    shutil.copy(os.path.join(ROOT, "train.py"), tmp_path / "train.py")
    shutil.copy(os.path.join(ROOT, "search_space.yaml"), tmp_path / "search_space.yaml")
    (tmp_path / "search_space.yaml").write_text(
        "smoke:\n  params:\n    MATRIX_LR: {low: 0.01, high: 0.1, log: true}\n")
    fake = FakeLLM()
    fake.script = [edit("softcap=15.0", "softcap=30.0", "a softer logit cap")]
    try:
        proc = loop_cli(["--trials", "2", "--baseline-runs", "1", "--budget", "2", "--strategy",
                         "llm", "--llm-scope", "code", "--llm-base-url", fake.url, "--llm-model",
                         "fake"], tmp_path)
    finally:
        fake.close()
    assert proc.returncode == 0, proc.stderr[-3000:]
    df = pd.read_csv(tmp_path / "results.tsv", sep="\t")
    assert df.status.tolist()[0] == "keep" and df.status[1] in ("keep", "discard", "retest")
    assert df.strategy[1] == "llm-code" and df.config[0] != df.config[1]
    assert df.description[1].startswith("llm code: a softer logit cap (+1 -1 lines)")
    assert "softcap=30.0" in open(tmp_path / "runs" / "0001" / "train.py").read()
    assert "\n---\nval_bpb:" in open(tmp_path / df.log[1]).read()
    assert "def train():" in fake.requests[0]["body"]["messages"][1]["content"]


def test_code_scope_needs_the_llm_strategy(tmp_path):
    proc = loop_cli(["--strategy", "centaur", "--llm-scope", "code"], tmp_path)
    assert proc.returncode == 2 and "--llm-scope code needs --strategy llm" in proc.stderr
