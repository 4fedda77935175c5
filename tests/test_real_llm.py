"""A real model (SmolLM2-135M-Instruct, Q4_1) behind llama-cpp-python's server on 127.0.0.1:
what format the server takes, that the proposal schema holds its answers inside the space, the
token counts and seconds it costs, and the server's start and stop."""
import json
import os
import socket
import time

import pytest

from autoresearch import local_llm
from autoresearch.chat import Chat, proposal_schema
from autoresearch.space import parse_space

# The cpu profile's space, as search_space.yaml has it: ranges, numeric and string choices, tuples.
SPACE = {"params": {
    "MATRIX_LR": {"low": 0.01, "high": 0.12, "log": True},
    "WEIGHT_DECAY": {"low": 0.0, "high": 0.4},
    "WARMUP_RATIO": {"choices": [0.0, 0.02, 0.05]},
    "ADAM_BETAS": {"choices": [[0.8, 0.95], [0.9, 0.95], [0.8, 0.99]]},
    "DEPTH": {"choices": [1, 2, 3, 4]},
    "WINDOW_PATTERN": {"choices": ["L", "SL", "SSL"]},
    "DEVICE_BATCH_SIZE": {"choices": [8, 16, 32]},
    "STEPS": {"low": 10, "high": 500, "int": True}}}
BEST = {"MATRIX_LR": 0.04, "WEIGHT_DECAY": 0.2, "WARMUP_RATIO": 0.0, "ADAM_BETAS": (0.8, 0.95),
        "DEPTH": 2, "WINDOW_PATTERN": "SL", "DEVICE_BATCH_SIZE": 16, "STEPS": 100}


@pytest.fixture(scope="module")
def space():
    return parse_space(SPACE, "cpu", BEST)


def messages(space):
    allowed = "\n".join(f"- {n}: " + (f"one of {json.dumps(p.json_schema()['enum'])}" if p.choices
                                      else f"{'integer' if p.integer else 'number'} from {p.low:g} "
                                           f"to {p.high:g}") for n, p in space.params.items())
    best = json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in BEST.items()})
    return [{"role": "system", "content": "You tune the training recipe of a small GPT. Answer with "
             'one JSON object: {"changes": {"CONSTANT": value, ...}, "rationale": "one sentence"}'},
            {"role": "user", "content": f"Allowed values:\n{allowed}\n\nBest configuration so far "
             f"(val_bpb 1.776): {best}\n\nPropose the next trial: change 1 to 4 constants."}]


@pytest.mark.real_llm
def test_the_server_takes_json_object_with_a_schema_and_its_refusal_costs_no_answer(llama_server, space):
    lines = []
    chat = Chat(base_url=llama_server.url, model=llama_server.model, timeout=120, max_retries=2,
                log=lines.append)
    reply = chat.complete(messages(space), proposal_schema(space), answer_tokens=300)
    assert [r[:2] for r in chat.refusals] == [("json_schema", 500)]
    assert "response_format" in chat.refusals[0][2]
    assert reply.format == "json_object+schema"
    # JSON and nothing else; the grammar lets raw control characters into strings, so strict=False.
    assert set(json.loads(reply.text, strict=False)) == {"changes", "rationale"}
    assert lines == ["llm endpoint: structured output as json_object+schema; it refused "
                     "json_schema (HTTP 500)"]
    # The tokens are the server's own count; the prompt is some 300-400 tokens.
    assert 200 < reply.prompt_tokens < 1000 and 0 < reply.completion_tokens < 300
    assert 0 < reply.seconds < 120 and chat.calls == 1 and chat.tokens == reply.tokens
    again = chat.complete(messages(space), proposal_schema(space), answer_tokens=300)
    assert again.format == "json_object+schema" and len(chat.refusals) == 1


@pytest.mark.real_llm
def test_the_constrained_schema_keeps_every_choice_inside_the_space(llama_server, space):
    """llama-cpp-python's grammar enforces names, enums and the rationale's length; it ignores
    numeric minimum/maximum, so ranges are counted, not asserted."""
    chat = Chat(base_url=llama_server.url, model=llama_server.model, timeout=120, log=lambda m: None)
    schema = proposal_schema(space)
    out_of_range = proposals = 0
    for _ in range(6):
        reply = chat.complete(messages(space), schema, answer_tokens=300)
        obj = json.loads(reply.text, strict=False)
        assert len(obj["rationale"]) <= schema["properties"]["rationale"]["maxLength"]
        for name, value in obj["changes"].items():
            p = space.params[name]  # no other name can be produced
            if p.choices is not None:
                assert p.contains(tuple(value) if isinstance(value, list) else value), (name, value)
            else:
                assert isinstance(value, (int, float)) and not isinstance(value, bool)
                if p.integer:
                    assert isinstance(value, int), (name, value)
                out_of_range += not p.low <= value <= p.high
        proposals += 1
    print(f"{proposals} proposals, {out_of_range} range values out of bounds, "
          f"{chat.tokens} tokens, {chat.seconds:.1f} s")


@pytest.mark.real_llm
def test_the_server_stops_with_its_context_and_says_why_it_cannot_start(tmp_path):
    if local_llm.server_missing():
        pytest.skip(f"llama-cpp-python's server is not installed; {local_llm.INSTALL_HINT}")
    bad = tmp_path / "not-a-model.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(1000))
    t0 = time.monotonic()
    with pytest.raises(local_llm.LocalLLMError, match="exited with code") as info:
        with local_llm.serve(str(bad), startup_timeout=60):
            pass
    assert time.monotonic() - t0 < 60 and "log" in str(info.value)
    with pytest.raises(local_llm.LocalLLMError, match="no model file"):
        with local_llm.serve(str(tmp_path / "absent.gguf")):
            pass
    model = local_llm.fetch_default_model()
    with local_llm.serve(model) as server:
        pid, port = server.pid, server.port
        assert server.url == f"http://127.0.0.1:{port}/v1"
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # gone, and reaped
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), 1):
        pass


def test_a_missing_server_package_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(local_llm, "SERVER_PACKAGES", local_llm.SERVER_PACKAGES + ("no_such_pkg_x",))
    with pytest.raises(local_llm.LocalLLMError, match=r"missing: .*no_such_pkg_x.*pip install"):
        with local_llm.serve(str(tmp_path / "m.gguf")):
            pass


# --- the LLM strategies end to end, with the real model ---------------------------------------

def loop_with_model(tmp_path, smoke_data, args):
    """loop.py on the fixture trainer (fast, known answers) with the real model proposing;
    a key in the environment that must end up in no file."""
    import shutil
    import subprocess
    import sys
    from conftest import FAKE, FAKE_SPACE, ROOT, SECRET
    shutil.copy(FAKE, tmp_path / "train.py")
    (tmp_path / "search_space.yaml").write_text(FAKE_SPACE)
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "loop.py"), "--judge", "threshold",
         "--baseline-runs", "1", "--llm-timeout", "900", *args], cwd=tmp_path, timeout=1800,
        capture_output=True, text=True,
        env=dict(os.environ, AUTORESEARCH_DATA=smoke_data.dir, OPENAI_API_KEY=SECRET))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    for root, _, files in os.walk(tmp_path):
        for name in files:
            assert SECRET.encode() not in open(os.path.join(root, name), "rb").read(), name
    import pandas as pd
    df = pd.read_csv(tmp_path / "results.tsv", sep="\t")
    proposals = {int(t): json.load(open(tmp_path / "runs" / f"{int(t):04d}" / "proposal.json"))
                 for t in df.trial[1:] if (tmp_path / "runs" / f"{int(t):04d}" / "proposal.json").exists()}
    return proc.stdout + proc.stderr, df, proposals


def check_proposals(df, proposals, prefix):
    """What the real model did, row by row: a proposal it made (its cost recorded, its values
    in the space), or a fallback whose reason is given."""
    for t, desc in zip(df.trial[1:], df.description[1:]):
        p = proposals[int(t)]
        assert p["calls"] >= 1 and p["tokens"] > 0 and p["seconds"] > 0
        assert p["format"] == "json_object+schema" and p["model"].startswith("SmolLM2")
        if p["outcome"] == "fallback":
            assert desc.startswith(f"{prefix}llm fallback (") and p["reason"]
        else:
            assert desc.startswith(f"{prefix}llm") and f"[{p['tokens']} tokens, " in desc


@pytest.mark.real_llm
def test_llm_strategy_with_the_local_model_served_by_the_loop(llama_server, tmp_path, smoke_data):
    out, df, proposals = loop_with_model(
        tmp_path, smoke_data, ["--strategy", "llm", "--trials", "4",
                               "--llm-gguf", local_llm.default_model_path()])
    assert "served by llama.cpp at http://127.0.0.1:" in out
    assert "llm endpoint: structured output as json_object+schema" in out
    assert len(df) == 4 and (df.status != "crash").all() and set(proposals) == {1, 2, 3}
    check_proposals(df, proposals, "")


@pytest.mark.real_llm
def test_centaur_with_the_local_model(llama_server, tmp_path, smoke_data):
    out, df, proposals = loop_with_model(
        tmp_path, smoke_data, ["--strategy", "centaur", "--trials", "5", "--llm-fraction", "0.5",
                               "--llm-base-url", llama_server.url, "--llm-model",
                               llama_server.model])
    assert len(df) == 5 and (df.status != "crash").all()
    by = [d.split(":")[0].split(" ")[0] for d in df.description[1:]]
    assert "centaur/cmaes" in by and len(proposals) >= 2  # every other proposal is the model's
    llm_rows = df[df.trial.isin(list(proposals))]
    check_proposals(pd_concat(df.iloc[:1], llm_rows), proposals, "centaur/")


def pd_concat(*frames):
    import pandas as pd
    return pd.concat(frames, ignore_index=True)


@pytest.mark.real_llm
def test_code_mode_with_the_local_model(llama_server, tmp_path, smoke_data):
    """A 135M model mostly writes unusable edits: each is caught (repair round, then a greedy
    fallback that says why) or, if usable, runs from the trial's own copy."""
    out, df, proposals = loop_with_model(
        tmp_path, smoke_data, ["--strategy", "llm", "--llm-scope", "code", "--trials", "3",
                               "--llm-base-url", llama_server.url, "--llm-model",
                               llama_server.model])
    assert len(df) == 3 and set(proposals) == {1, 2}
    for t, desc in zip(df.trial[1:], df.description[1:]):
        p = proposals[int(t)]
        assert p["tokens"] > 0 and p["prompt_chars"] > 1000  # the whole train.py was in it
        diff = tmp_path / "runs" / f"{int(t):04d}" / "edit.diff"
        if p["outcome"] == "fallback":
            assert desc.startswith("llm fallback (") and not diff.exists()
        else:
            assert desc.startswith("llm code: ") and diff.exists()
