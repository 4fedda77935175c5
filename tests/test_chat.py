"""autoresearch.chat through the real `openai` client against the scripted server on 127.0.0.1,
refusing formats the way real servers do; and the proposal schema a space gives."""
import json
import time

import openai
import pytest

from autoresearch.chat import BudgetSpent, Chat, proposal_schema
from autoresearch.space import parse_space
from conftest import REFUSES, SECRET, FakeLLM, response_format_of

SCHEMA = {"type": "object", "properties": {"changes": {"type": "object"}}}
MESSAGES = [{"role": "user", "content": "propose"}]
ANSWER = '{"changes": {"DEPTH": 3}, "rationale": "deeper"}'


@pytest.fixture
def endpoint(monkeypatch):
    made = []
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)

    def make(refuse=None, **options):
        fake = FakeLLM(refuse)
        lines = []
        chat = Chat(base_url=fake.url, model="fake", **({"timeout": 2.0, "max_retries": 2} | options),
                    log=lines.append)
        made.append(fake)
        return fake, chat, lines

    yield make
    for fake in made:
        fake.close()


def formats(fake):
    return [response_format_of(r["body"]) for r in fake.requests]


def test_an_endpoint_that_takes_json_schema_gets_it_and_the_schema(endpoint):
    fake, chat, lines = endpoint()
    fake.script = [ANSWER]
    reply = chat.complete(MESSAGES, SCHEMA)
    assert reply.text == ANSWER and reply.format == "json_schema"
    assert fake.requests[0]["body"]["response_format"]["json_schema"]["schema"] == SCHEMA
    assert fake.requests[0]["auth"] == f"Bearer {SECRET}"
    assert lines == ["llm endpoint: structured output as json_schema"]


def test_llama_cpp_python_refuses_json_schema_with_a_500_and_the_call_still_answers(endpoint):
    fake, chat, lines = endpoint(REFUSES["llama-cpp-python"])
    fake.script = [ANSWER, ANSWER, ANSWER]
    reply = chat.complete(MESSAGES, SCHEMA)
    # One refused request, not retried by the client (max_retries=2), then the same request in
    # the next format, at once.
    assert formats(fake) == ["json_schema", "json_object+schema"]
    assert reply.text == ANSWER and reply.format == "json_object+schema"
    assert fake.requests[1]["body"]["response_format"] == {"type": "json_object", "schema": SCHEMA}
    assert fake.requests[1]["body"]["messages"] == MESSAGES
    chat.complete(MESSAGES, SCHEMA)
    chat.complete(MESSAGES, SCHEMA)
    assert formats(fake)[2:] == ["json_object+schema"] * 2  # remembered for the rest of the run
    assert lines == ["llm endpoint: structured output as json_object+schema; it refused "
                     "json_schema (HTTP 500)"]
    assert chat.calls == 3 and chat.refusals[0][:2] == ("json_schema", 500)


def test_a_text_only_endpoint_steps_down_to_text_within_one_call(endpoint):
    fake, chat, lines = endpoint(REFUSES["text-only"])
    fake.script = [ANSWER, ANSWER]
    assert chat.complete(MESSAGES, SCHEMA).format == "text"
    assert formats(fake) == ["json_schema", "json_object+schema", "json_object", "text"]
    assert "response_format" not in fake.requests[-1]["body"]
    chat.complete(MESSAGES, SCHEMA)
    assert formats(fake)[4:] == ["text"] and len(lines) == 1


def test_lm_studio_keeps_json_schema(endpoint):
    fake, chat, lines = endpoint(REFUSES["lm-studio"])
    fake.script = [ANSWER]
    assert chat.complete(MESSAGES, SCHEMA).format == "json_schema" and len(fake.requests) == 1


def test_the_answer_can_be_capped(endpoint):
    fake, chat, _ = endpoint()
    fake.script = [ANSWER, ANSWER]
    chat.complete(MESSAGES, SCHEMA, answer_tokens=300)
    chat.complete(MESSAGES, SCHEMA)
    assert fake.requests[0]["body"]["max_tokens"] == 300 and "max_tokens" not in fake.requests[1]["body"]


def test_without_a_schema_json_mode_comes_first(endpoint):
    fake, chat, _ = endpoint()
    fake.script = [ANSWER]
    assert chat.complete(MESSAGES).format == "json_object"
    assert fake.requests[0]["body"]["response_format"] == {"type": "json_object"}


def test_an_error_that_is_not_about_the_format_is_not_a_refusal(endpoint):
    fake, chat, _ = endpoint()
    fake.script = [{"status": 400, "body": "This model's maximum context length is 8192 tokens"}]
    with pytest.raises(openai.BadRequestError):
        chat.complete(MESSAGES, SCHEMA)
    assert formats(fake) == ["json_schema"] and chat.level == 0 and chat.calls == 0


def test_a_server_error_on_the_first_try_keeps_the_clients_retries(endpoint):
    fake, chat, _ = endpoint()
    fake.script = [{"status": 500, "body": "out of memory"}, {"status": 503, "body": "busy"}, ANSWER]
    reply = chat.complete(MESSAGES, SCHEMA)
    # 1 + max_retries requests in all, as the client alone would send; the format stays.
    assert reply.format == "json_schema" and formats(fake) == ["json_schema"] * 3
    fake.script = [{"status": 500, "body": "out of memory"}] * 3
    with pytest.raises(openai.InternalServerError):
        chat.complete(MESSAGES, SCHEMA)
    assert len(fake.requests) == 6


def test_tokens_seconds_and_the_budget(endpoint):
    fake, chat, _ = endpoint(max_calls=2)
    fake.script = [{"hang": 0.3}, ANSWER, ANSWER]
    reply = chat.complete(MESSAGES, SCHEMA)
    assert (reply.prompt_tokens, reply.completion_tokens, reply.tokens) == (100, 20, 120)
    assert reply.seconds >= 0.3 and reply.finish_reason == "stop"
    chat.complete(MESSAGES, SCHEMA)
    assert chat.calls == 2 and chat.tokens == 240 and chat.seconds >= 0.3
    with pytest.raises(BudgetSpent, match=r"budget spent \(2 calls, 240 tokens\)"):
        chat.complete(MESSAGES, SCHEMA)
    assert len(fake.requests) == 2
    fake2, chat2, _ = endpoint(max_tokens=100)
    fake2.script = [ANSWER, ANSWER]
    chat2.complete(MESSAGES, SCHEMA)
    with pytest.raises(BudgetSpent):
        chat2.complete(MESSAGES, SCHEMA)


def test_a_hung_endpoint_times_out(endpoint):
    fake, chat, _ = endpoint(timeout=0.5, max_retries=0)
    fake.script = [{"hang": 3}]
    t0 = time.time()
    with pytest.raises(openai.APITimeoutError):
        chat.complete(MESSAGES, SCHEMA)
    assert time.time() - t0 < 2.5 and chat.level == 0


def test_the_key(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(ValueError, match=r"\$OPENAI_API_KEY"):
        Chat()
    fake = FakeLLM(REFUSES["llama-cpp-python"])
    try:
        lines = []
        chat = Chat(base_url=fake.url, model="fake", log=lines.append)  # a local endpoint: no key
        fake.script = [ANSWER]
        chat.complete(MESSAGES, SCHEMA)
        assert {r["auth"] for r in fake.requests} == {"Bearer unused"}
        monkeypatch.setenv("MY_KEY", SECRET)
        chat = Chat(base_url=fake.url, model="fake", key_env="MY_KEY", log=lines.append)
        fake.script = [ANSWER]
        chat.complete(MESSAGES, SCHEMA)
        assert fake.requests[-1]["auth"] == f"Bearer {SECRET}"
        assert SECRET not in " ".join(lines) + repr(chat.refusals)
    finally:
        fake.close()


SPACE = {"params": {"LR": {"low": 0.01, "high": 0.1, "log": True}, "DEPTH": {"choices": [2, 4]},
                    "STEPS": {"low": 10, "high": 50, "int": True},
                    "BETAS": {"choices": [[0.8, 0.95], [0.9, 0.99]]},
                    "WINDOW": {"choices": ["L", "SL"]}}}
CONSTANTS = {"LR": 0.04, "DEPTH": 2, "STEPS": 20, "BETAS": (0.8, 0.95), "WINDOW": "L"}


def test_the_proposal_schema_names_each_constant_with_its_allowed_values():
    space = parse_space(SPACE, "cpu", CONSTANTS)
    schema = proposal_schema(space)
    changes = schema["properties"]["changes"]
    assert changes["additionalProperties"] is False and changes["minProperties"] == 1
    assert changes["properties"] == {
        "LR": {"type": "number", "minimum": 0.01, "maximum": 0.1},
        "DEPTH": {"enum": [2, 4]},
        "STEPS": {"type": "integer", "minimum": 10, "maximum": 50},
        "BETAS": {"enum": [[0.8, 0.95], [0.9, 0.99]]},
        "WINDOW": {"enum": ["L", "SL"]}}
    assert schema["required"] == ["changes", "rationale"] and schema["additionalProperties"] is False
    json.dumps(schema)  # plain JSON: tuples became arrays


def test_llama_cpp_turns_the_proposal_schema_into_a_grammar_that_enforces_the_choices():
    """llama-cpp-python falls back to unconstrained JSON, silently, on a schema its converter
    does not take; this one it takes, and the grammar holds every choice literally."""
    grammar_module = pytest.importorskip("llama_cpp.llama_grammar",
                                         reason="llama-cpp-python is not installed")
    grammar = grammar_module.json_schema_to_gbnf(json.dumps(proposal_schema(parse_space(
        SPACE, "cpu", CONSTANTS))))
    assert '"[0.8, 0.95]" | "[0.9, 0.99]"' in grammar and '"\\"SL\\""' in grammar
    assert "changes-additional" not in grammar  # no other names
