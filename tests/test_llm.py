"""The LLM proposer through the real `openai` client against a scripted OpenAI-compatible server
on 127.0.0.1: good answers, sloppy answers, hostile answers, no answers."""
import json
import os
import time

import pandas as pd
import pytest

from autoresearch import history, judge
from autoresearch.proposers import Context
from autoresearch.proposers.llm import LLMProposer, extract_json
from autoresearch.space import parse_space
from conftest import SECRET


@pytest.fixture
def llm_work(fake_llm_work):
    return fake_llm_work(timeout=1.0, max_retries=2)


def ok(changes, rationale="because"):
    return json.dumps({"changes": changes, "rationale": rationale})


def test_valid_json_and_a_fenced_answer(llm_work):
    driver, fake, work = llm_work
    fake.script = [ok({"MATRIX_LR": 0.08}, "higher LR trains faster"),
                   "Sure! Here is my proposal:\n```json\n" + ok({"DEPTH": 1}) + "\n```\nGood luck."]
    row = driver.step()
    assert row["description"].startswith("llm: higher LR trains faster [120 tokens, ")
    assert row["params"]["MATRIX_LR"] == 0.08 and row["status"] == "keep"
    row = driver.step()
    assert row["description"].startswith("llm: because") and row["params"]["DEPTH"] == 1
    prompt = fake.requests[0]["body"]["messages"][1]["content"]
    assert "MATRIX_LR: number from 0.01 to 0.32 (log scale)" in prompt
    assert "val_bpb 1." in prompt and "constraint: TOTAL_BATCH_SIZE" in prompt
    fmt = fake.requests[0]["body"]["response_format"]
    assert fmt["type"] == "json_schema"  # the strongest format first
    allowed = fmt["json_schema"]["schema"]["properties"]["changes"]["properties"]
    assert allowed["DEPTH"] == {"enum": [1, 2, 3]} and allowed["MATRIX_LR"]["maximum"] == 0.32
    proposal = json.load(open(work / "runs" / "0001" / "proposal.json"))
    assert proposal["outcome"] == "valid" and proposal["tokens"] == 120
    assert proposal["format"] == "json_schema" and proposal["seconds"] >= 0
    assert fake.requests[0]["auth"] == f"Bearer {SECRET}"


def test_bad_values_get_one_repair_round(llm_work):
    driver, fake, work = llm_work
    fake.script = [ok({"MATRIX_LR": 5.0, "NOT_A_CONSTANT": 1}), ok({"MATRIX_LR": 0.1})]
    row = driver.step()
    assert row["description"].startswith("llm: ") and row["params"]["MATRIX_LR"] == 0.1
    repair = fake.requests[1]["body"]["messages"][-1]["content"]
    assert "cannot be used" in repair and ("outside" in repair or "not in the search space" in repair)


def test_an_injection_attempt_never_reaches_train_py(llm_work):
    driver, fake, work = llm_work
    evil = "0.1\nimport os; os.system('touch pwned')"
    fake.script = [ok({"MATRIX_LR": evil}), ok({"DEPTH": "3); import os; os.system('touch pwned'"})]
    row = driver.step()
    assert row["description"].startswith("llm fallback (") and "greedy:" in row["description"]
    assert not (work / "pwned").exists()
    for r in driver.rows:
        assert "import os" not in open(work / os.path.dirname(r["log"]) / "train.py").read().split("BEHAVIOUR")[0]
    assert row["status"] in ("keep", "discard")  # the trial still ran, with a numeric proposal


def test_empty_answers_fall_back(llm_work):
    driver, fake, work = llm_work
    fake.script = ["", "   "]
    row = driver.step()
    assert row["description"].startswith("llm fallback (the answer was empty)")


def test_429_is_retried_by_the_client(llm_work):
    driver, fake, work = llm_work
    fake.script = [{"status": 429, "body": "rate limited"}, ok({"DEVICE_BATCH_SIZE": 8})]
    row = driver.step()
    assert row["description"].startswith("llm: ") and row["params"]["DEVICE_BATCH_SIZE"] == 8
    assert len(fake.requests) == 2


def test_a_hung_endpoint_times_out_and_the_loop_goes_on(llm_work):
    driver, fake, work = llm_work
    driver.proposer.chat.client = driver.proposer.chat.client.with_options(max_retries=0)
    fake.script = [{"hang": 3}]
    t0 = time.time()
    row = driver.step()
    assert row["description"].startswith("llm fallback (APITimeoutError)")
    assert time.time() - t0 < 20 and row["status"] in ("keep", "discard")


def test_endpoint_without_json_schema_steps_down_without_losing_the_answer(llm_work):
    driver, fake, work = llm_work
    fake.script = [{"status": 400, "body": "response_format json_schema is not supported"},
                   ok({"DEPTH": 3}), ok({"DEPTH": 1})]
    row = driver.step()
    assert row["params"]["DEPTH"] == 3 and row["description"].startswith("llm: ")
    driver.step()
    formats = [r["body"].get("response_format", {}).get("type") for r in fake.requests]
    assert formats == ["json_schema", "json_object", "json_object"]  # remembered for the run
    assert "DEPTH" in json.dumps(fake.requests[1]["body"]["response_format"]["schema"])


def test_call_cap_and_the_key_is_written_nowhere(llm_work):
    driver, fake, work = llm_work
    driver.proposer.chat.max_calls = 2
    fake.script = [ok({"DEPTH": 3}), ok({"DEPTH": 1}), ok({"MATRIX_LR": 0.2})]
    descriptions = [driver.step()["description"] for t in (1, 2, 3)]
    assert descriptions[0].startswith("llm: ") and descriptions[1].startswith("llm: ")
    assert descriptions[2].startswith("llm fallback (budget spent (2 calls")
    assert len(fake.requests) == 2
    df = pd.read_csv(work / "results.tsv", sep="\t")
    assert len(df) == 4
    for root, _, files in os.walk(work):
        for name in files:
            assert SECRET.encode() not in open(os.path.join(root, name), "rb").read(), name


def test_extract_json_is_lenient_but_not_credulous():
    assert extract_json('noise {"a": 1} more') == {"a": 1}
    assert extract_json('```\n{"b": [1, 2]}\n```') == {"b": [1, 2]}
    with pytest.raises(Exception, match="no JSON object"):
        extract_json("[1, 2, 3]")


def test_centaur_shares_cma_state_with_the_llm_and_tells_cma_everything(fake_llm_work):
    driver, fake, _ = fake_llm_work("centaur", baseline=False, timeout=2.0, llm_fraction=0.5)
    fake.script = [ok({"MATRIX_LR": 0.08}, "toward the optimum"), ok({"DEPTH": 1}),
                   ok({"DEVICE_BATCH_SIZE": 8})]
    rows = [driver.step() for t in range(9)]
    by = [r["description"].split(":")[0] for r in rows[1:]]
    assert by.count("centaur/llm") >= 3 and by.count("centaur/cmaes") >= 3, by
    prompt = fake.requests[0]["body"]["messages"][1]["content"]
    assert "CMA-ES state" in prompt and "mean configuration" in prompt and "step size sigma" in prompt
    proposer = driver.proposer
    assert proposer.llm_points >= 3
    # Every finished trial after the baseline went into a CMA-ES generation (told or pending).
    told = proposer.cma.generation * proposer.cma.population_size + len(proposer.generation)
    assert told >= 8 - 1 and proposer.cma.generation >= 1


def test_the_prompt_shows_means_run_counts_and_the_noise():
    space = parse_space({"params": {"LR": {"low": 0.01, "high": 0.1, "log": True}}}, "cpu",
                        {"LR": 0.04, "SEED": 1})
    proposer = LLMProposer(space, client=object())  # prompts only: nothing is sent

    def row(trial, val, seed, lr=0.04, status="discard"):
        return {"trial": trial, "status": status, "val_bpb": f"{val:.6f}", "description": "",
                "seed": seed, "params": json.dumps({"LR": lr})}

    def prompt(rows):
        configs = history.configs_of(history.runs_of(rows))
        inc = history.incumbent_of(history.runs_of(rows), configs)
        return proposer.prompt(Context(best={"LR": 0.04}, best_value=inc.mean, best_runs=inc.n,
                                       configs=configs, noise=judge.noise_floor(configs),
                                       source="", defaults={}, check=lambda *a: None))
    once = prompt([row(0, 1.00, 1, status="keep"), row(1, 1.02, 1, lr=0.05)])
    assert "Noise:" not in once and "1.000000 over 1 run  incumbent" in once
    assert "1.020000 over 1 run  discard" in once
    twice = prompt([row(0, 1.00, 1, status="keep"), row(1, 1.02, 2, status="keep"),
                    row(2, 0.99, 1, lr=0.05, status="retest")])
    assert "about 0.014142 val_bpb" in twice and "mean of 2 runs" in twice
    assert "1.010000 +-0.0141 over 2 runs  incumbent" in twice
    assert "0.990000 over 1 run  racing" in twice


def test_the_prompt_carries_curves_and_the_report_sums_the_cost(llm_work):
    from autoresearch import report
    driver, fake, work = llm_work
    fake.script = [ok({"MATRIX_LR": 0.08}), ok({"DEPTH": 1}), "not json", "still not json"]
    for t in (1, 2, 3):
        driver.step()
    prompt = fake.requests[1]["body"]["messages"][1]["content"]
    assert "curve: smoothed train loss at 10, 25, 50, 75 and 100%" in prompt
    assert "loss 6.00 5.50 5.00 4.50 4.00, 5 steps, 1.0k tok/s, improving" in prompt
    assert json.load(open(work / "runs" / "0001" / "curve.json"))["signal"] == "improving"
    df = report.load_results(str(work / "results.tsv"))
    text = report.format_summary(report.summarize(df, results_dir=str(work)))
    assert "llm cost (llm): 3 proposals, 480 tokens" in text  # 120 + 120 + 2 x 120 (repair)
    assert "valid 2, after repair 0, fell back 1" in text
    assert "incumbent's latest run: loss 6.00" in text


def test_a_raced_proposal_is_costed_once(fake_llm_work):
    """Its re-runs carry the proposal along (the proposer hears the verdict), not its cost."""
    from autoresearch import report
    driver, fake, work = fake_llm_work(judge="noise", timeout=1.0, max_retries=2)
    fake.script = [ok({"MATRIX_LR": 0.08})]
    rows = []
    while not any("llm: because" in r["description"] and r["status"] == "keep" for r in rows):
        rows.append(driver.step())
        assert len(rows) < 8
    raced = [r for r in rows if "llm: because" in r["description"]]
    assert len(raced) == 2 and raced[-1]["status"] == "keep", [r["description"] for r in rows]
    assert len(list(work.glob("runs/*/proposal.json"))) == 1
    df = report.load_results(str(work / "results.tsv"))
    text = report.format_summary(report.summarize(df, results_dir=str(work)))
    assert "llm cost (llm): 1 proposals, 120 tokens" in text
