"""The trial runner against fixture trainers that misbehave, and the results ledger."""
import multiprocessing
import os
import time

import pandas as pd
import pytest

from autoresearch import ledger as L
from autoresearch.record import Record
from autoresearch.patch import patch_constants
from autoresearch.runner import run_trial
from conftest import ROOT

FAKE = open(os.path.join(ROOT, "tests", "fixtures", "fake_train.py")).read()


def fake(**constants):
    return patch_constants(FAKE, constants)


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("behaviour,error", [
    ("oom_above_4", "oom"),
    ("garbage", "error: exit 3: val_bpb 1.0 (no colon, no block)"),
    ("exit0", "error: no summary block"),
    ("traceback", "error: ValueError: boom: something broke in the model"),
    ("nan", "nan"),
])
def test_failures_are_classified(tmp_path, smoke_data, behaviour, error):
    out = run_trial(str(tmp_path / "t"), fake(BEHAVIOUR=behaviour), 60, smoke_data.dir)
    assert not out.ok and out.error == error
    assert os.path.exists(out.log) and open(out.log).read()


def test_success_parses_the_summary_and_streams_lines(tmp_path, smoke_data, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret")
    monkeypatch.setenv("HF_TOKEN", "hf-secret")
    seen = []
    out = run_trial(str(tmp_path / "t"), fake(BEHAVIOUR="env", MATRIX_LR=0.08), 60, smoke_data.dir,
                    on_line=seen.append)
    assert out.ok and out.error == "" and out.summary["val_bpb"] == pytest.approx(1.02)
    assert out.summary["num_steps"] == 2.0 and out.summary["device"] == "cpu"
    assert seen[0].startswith("step 00001") and "SECRETS " in seen  # no key reached the trainer
    assert "sk-secret" not in open(out.log).read()


def test_timeout_kills_the_whole_process_group(tmp_path, smoke_data):
    t0 = time.time()
    out = run_trial(str(tmp_path / "t"), fake(BEHAVIOUR="hang_child"), 3, smoke_data.dir)
    assert out.error == "timeout" and time.time() - t0 < 20
    child = int(open(tmp_path / "t" / "child.pid").read())
    deadline = time.time() + 5
    while alive(child) and time.time() < deadline:
        time.sleep(0.1)
    assert not alive(child)


# --- the score is the fixed evaluation's, not the printed one ----------------------------------

EVAL = "val_bpb = fixed_evaluation(val_bpb)\n"


@pytest.mark.parametrize("replacement,error", [
    ("fixed_evaluation(val_bpb)\nval_bpb = 0.5\n",
     "error: contract: printed val_bpb 0.500000 is not the fixed evaluation's 1.500453"),
    ("pass\n", "error: contract: no fixed evaluation (evaluate_bpb never completed)"),
    (EVAL + 'print("---")\nprint("val_bpb:          0.100000")\n',
     "error: contract: more than one summary block"),
])
def test_a_summary_that_disagrees_with_the_fixed_evaluation_is_a_crash(tmp_path, smoke_data,
                                                                       replacement, error):
    src = FAKE.replace(EVAL, replacement)
    if "more than one" in error:  # the extra block goes after the real one, whole
        src = FAKE + 'print("---")\n' + "\n".join(
            f'print("{k}: 0.1")' for k in ("val_bpb", "training_seconds", "total_seconds",
                                           "peak_vram_mb", "mfu_percent", "total_tokens_M",
                                           "num_steps", "num_params_M", "depth")) + "\n"
    out = run_trial(str(tmp_path / "t"), src, 60, smoke_data.dir)
    assert not out.ok and out.error == error


@pytest.mark.parametrize("client,error", [
    # Losses that drift from call to call: a model that changes while it is evaluated.
    ("_calls = [0]\n"
     "def drift(target):\n    _calls[0] += 1\n    return target * (1 + 0.01 * _calls[0])\n",
     "error: contract: stateful (rows scored a second time got other losses"),
    # Losses of the wrong size.
    ("def drift(target):\n    return target\n"
     "_send = Connection.send_bytes\n"
     "Connection.send_bytes = lambda self, b: _send(self, b if b[:1] == b'{' else b[:8])\n",
     "error: contract: protocol: 8 bytes of losses"),
])
def test_a_lying_evaluation_client_is_caught(tmp_path, smoke_data, client, error):
    src = FAKE.replace("def fixed_evaluation(target):",
                       client + "\n\ndef fixed_evaluation(target):")
    src = src.replace("(target * math.log(2)", "(drift(target) * math.log(2)")
    out = run_trial(str(tmp_path / "t"), src, 60, smoke_data.dir)
    assert not out.ok and out.error.startswith(error), out.error


def test_the_trainer_never_sees_the_validation_rows_it_is_scored_on(tmp_path, smoke_data):
    """What crosses the socket is inputs and targets, batch by batch; the val split itself is
    read by the loop (here, without a sandbox, the path is still open: see test_sandbox)."""
    out = run_trial(str(tmp_path / "t"), fake(MATRIX_LR=0.08), 60, smoke_data.dir)
    assert out.ok and out.summary["val_bpb"] == pytest.approx(1.02, abs=1e-6)
    printed = float(next(line for line in open(out.log) if line.startswith("val_bpb:")).split()[1])
    assert abs(printed - out.summary["val_bpb"]) <= 5e-7


# --- ledger ----------------------------------------------------------------------------------

def row(trial, **kw):
    base = {"commit": "abc1234", "val_bpb": 1.0 - trial / 1000, "memory_gb": 1.25,
            "status": "keep" if trial == 0 else "discard", "description": f"trial {trial}",
            "trial": trial, "started_at": L.now_iso(), "strategy": "greedy", "profile": "smoke",
            "seed": 42, "changes": {"LR": 0.1}, "params": {"LR": 0.1, "DEPTH": 2},
            "training_seconds": 1.0, "total_seconds": 2.0, "mfu_percent": 0.0, "num_steps": 5,
            "total_tokens_M": 0.1, "num_params_M": 0.2, "error": "", "log": "runs/0000/run.log"}
    return base | kw


def _writer(path, n):
    record = Record(path)
    for _ in range(n):
        trial = record.reserve({"config": f"c{os.getpid()}", "purpose": "new"}, [])
        assert trial is not None
        record.finish(trial, row(trial, description="x" * (trial % 300), status="discard"))
        record.rows()  # the view after every run, as the loop writes it
    record.close()


def test_concurrent_writers_share_one_study_and_never_tear_the_view(tmp_path):
    path = str(tmp_path / "results.tsv")
    procs = [multiprocessing.Process(target=_writer, args=(path, 25)) for k in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert all(p.exitcode == 0 for p in procs)
    Record(path).rows()  # the last view
    df = pd.read_csv(path, sep="\t")
    assert list(df.columns) == L.COLUMNS and len(df) == 100
    assert sorted(df.trial) == list(range(100))  # numbers unique across the writers
    assert (df.description.fillna("").str.len() == df.trial % 300).all()  # no row torn
    assert os.path.exists(tmp_path / "results.journal")


def test_fields_are_sanitised_and_formatted(tmp_path):
    path = str(tmp_path / "results.tsv")
    L.write_atomic(path, L.HEADER + L.format_row(
        row(0, description="tab\there\nnewline", error="error: a\tb", val_bpb=float("nan"))))
    df = pd.read_csv(path, sep="\t")
    assert df.description[0] == "tab here newline" and df.val_bpb[0] == 0.0
    line = open(path).read().splitlines()[1].split("\t")
    assert line[1] == "0.000000" and line[2] == "1.2"  # 6 decimals, 1 decimal
    with pytest.raises(ValueError, match="unknown results column"):
        L.format_row(row(1, colour="red"))


def test_a_torn_tail_is_ignored(tmp_path):
    path = str(tmp_path / "results.tsv")
    L.write_atomic(path, L.HEADER + L.format_row(row(0)))
    with open(path, "a") as f:
        f.write("deadbee\t0.5")  # what a writer killed mid-row would leave (not us: a rename)
    assert [r["trial"] for r in L.Ledger(path).rows()] == ["0"]


def test_a_torn_journal_line_is_cut_off_and_the_study_goes_on(tmp_path):
    path = str(tmp_path / "results.tsv")
    record = Record(path)
    trial = record.reserve({"config": "a", "purpose": "new"}, [])
    record.finish(trial, row(trial))
    record.close()
    with open(tmp_path / "results.journal", "a") as f:
        f.write('{"op_code":5,"worker_id":"x","trial_id":0,"st')  # a crash mid-write
    record = Record(path)
    trial = record.reserve({"config": "b", "purpose": "new"}, [])
    record.finish(trial, row(trial))
    assert [r["trial"] for r in record.rows()] == ["0", "1"]
    record.close()


def test_bind_refuses_another_profile_or_dataset(tmp_path):
    ledger = L.Ledger(str(tmp_path / "results.tsv"))
    ledger.bind("smoke", "data-a")
    assert not os.path.exists(ledger.meta_path)  # nothing written until the first row
    ledger.write_claim()
    ledger.bind("smoke", "data-a")
    with pytest.raises(L.LedgerError, match="dataset|data"):
        ledger.bind("smoke", "data-b")
    with pytest.raises(L.LedgerError, match="profile 'smoke'"):
        L.write_atomic(ledger.path, L.HEADER + L.format_row(row(0)))
        L.Ledger(ledger.path).bind("cpu", "data-a")
