"""One OpenAI-compatible chat endpoint, asked for JSON in the strongest form it accepts.

Endpoints differ in the structured output they take: OpenAI and vLLM take `json_schema`;
llama-cpp-python's server rejects it (HTTP 500) and takes `json_object` with a `schema`; some
take only plain JSON mode, some nothing at all. Chat tries the formats strongest first and steps
down on a refusal (a 4xx, or a 5xx whose message is about the format), re-sending the same
request at once, so a refusal never costs an answer. What the endpoint took is remembered for
the rest of the run and said once in the log. The last step, text, leaves the JSON to the
prompt and the caller's lenient parser.

Each call's prompt and completion tokens, wall seconds and format come back in a Reply; calls
and tokens are capped per run. The key is read from the environment into the client object and
nowhere else: it is never logged, written, or put into an error message.
"""
import os
import time
from dataclasses import dataclass

from autoresearch import config

FORMATS = ("json_schema", "json_object+schema", "json_object", "text")
# Words a format refusal's message carries; a 4xx without them (a context too long, a bad
# model name) is an error no other format would fix.
_FORMAT_WORDS = ("response_format", "json", "schema", "format", "grammar")


class BudgetSpent(Exception):
    """The run's cap on calls or tokens is reached; no request was sent."""


@dataclass
class Reply:
    text: str
    prompt_tokens: int
    completion_tokens: int
    seconds: float          # wall time of the whole call, refused formats included
    format: str             # one of FORMATS: what the endpoint took
    finish_reason: str = ""  # "length" means the answer was cut off

    @property
    def tokens(self):
        return self.prompt_tokens + self.completion_tokens


def response_format(fmt, schema):
    """The request's response_format for one of FORMATS (None for text)."""
    if fmt == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": "proposal", "schema": schema,
                                                       "strict": False}}
    if fmt == "json_object+schema":
        return {"type": "json_object", "schema": schema}
    if fmt == "json_object":
        return {"type": "json_object"}
    return None


def is_format_refusal(error):
    """Whether an openai.APIStatusError says the endpoint does not take the response format."""
    status = getattr(error, "status_code", 0)
    if not (400 <= status < 600) or status in (401, 403, 404, 408, 409, 429):
        return False
    return any(word in _message(error).lower() for word in _FORMAT_WORDS)


def _retryable(error):
    """What the openai client itself retries: connection failures, timeouts, 408, 409, 429, 5xx."""
    status = getattr(error, "status_code", None)
    return status is None or status in (408, 409, 429) or status >= 500


def _message(error):
    body = getattr(error, "body", None)
    if isinstance(body, dict):
        body = body.get("error", body)
        if isinstance(body, dict):
            body = body.get("message", body)
    return f"{body} {getattr(error, 'message', '')}"


class Chat:
    """complete(messages, schema) -> Reply, negotiating the structured-output format.

    base_url: the endpoint (default $OPENAI_BASE_URL, else OpenAI's); model: default
    $AUTORESEARCH_LLM_MODEL, else gpt-4o-mini; the key is read from $key_env (a base_url of
    one's own needs none). timeout is per request; max_retries is the client's own retrying of
    timeouts, 429 and 5xx; max_calls and max_tokens cap the run's answered calls and their
    tokens (prompt and completion). log: a callable taking one line."""

    def __init__(self, base_url=None, model=None, key_env="OPENAI_API_KEY", timeout=60.0,
                 max_retries=3, max_calls=200, max_tokens=2_000_000, temperature=0.7,
                 client=None, log=print):
        self.model = model or config.llm_model() or "gpt-4o-mini"
        self.max_calls, self.max_tokens, self.temperature = max_calls, max_tokens, temperature
        self.log = log
        self.calls = self.tokens = 0
        self.seconds = 0.0
        self.level = 0          # index into FORMATS where the next request starts
        self.format = None      # the format the endpoint took last, once it answered
        self.refusals = []      # (format, HTTP status, first words of the message)
        if client is None:
            import openai
            base_url = base_url or os.environ.get("OPENAI_BASE_URL")
            key = os.environ.get(key_env) or ("unused" if base_url else None)
            if not key:
                raise ValueError(f"the llm strategy needs an API key in ${key_env} (or a local "
                                 f"--llm-base-url, which needs none)")
            client = openai.OpenAI(base_url=base_url, api_key=key, timeout=timeout,
                                   max_retries=max_retries)
        self.client = client

    def complete(self, messages, schema=None, answer_tokens=None):
        """The endpoint's answer to messages, as JSON following schema where the endpoint
        enforces it. answer_tokens caps the answer (sent as max_tokens; a small local model held to
        a loose schema can otherwise write until its context is full). Raises BudgetSpent
        before sending once the caps are reached, and the openai errors that no format change
        fixes (timeouts, 5xx after the client's retries)."""
        if self.calls >= self.max_calls or self.tokens >= self.max_tokens:
            raise BudgetSpent(f"budget spent ({self.calls} calls, {self.tokens} tokens)")
        t0 = time.monotonic()
        resp, fmt = self._send(messages, schema, answer_tokens)
        seconds = time.monotonic() - t0
        if fmt != self.format:
            refused = ", ".join(f"{f} (HTTP {s})" for f, s, _ in self.refusals)
            self.log(f"llm endpoint: structured output as {fmt}"
                     + (f"; it refused {refused}" if refused else ""))
            self.format = fmt
        usage = resp.usage
        prompt = (usage.prompt_tokens or 0) if usage else 0
        completion = (usage.completion_tokens or 0) if usage else 0
        self.calls += 1
        self.tokens += prompt + completion
        self.seconds += seconds
        choice = resp.choices[0] if resp.choices else None
        return Reply(text=(choice.message.content or "") if choice else "", prompt_tokens=prompt,
                     completion_tokens=completion, seconds=seconds, format=fmt,
                     finish_reason=(choice.finish_reason or "") if choice else "")

    def _send(self, messages, schema, answer_tokens):
        """(the response, the format it was asked in): the strongest format the endpoint has
        not refused, stepping down a level on each refusal."""
        import openai
        level = self.level
        while True:
            fmt = FORMATS[level]
            if schema is None and "schema" in fmt:
                level += 1
                continue
            kwargs = dict(model=self.model, messages=messages, temperature=self.temperature)
            if answer_tokens:
                kwargs["max_tokens"] = answer_tokens
            if response_format(fmt, schema):
                kwargs["response_format"] = response_format(fmt, schema)
            # A format not yet known to work is tried without the client's retries, so that a
            # refusal (llama-cpp-python's is a 500) is not re-sent with backoff first.
            client = self.client if fmt == self.format or fmt == "text" \
                else self.client.with_options(max_retries=0)
            try:
                return client.chat.completions.create(**kwargs), fmt
            except (openai.APIStatusError, openai.APIConnectionError) as e:
                if fmt != "text" and isinstance(e, openai.APIStatusError) and is_format_refusal(e):
                    self.refusals.append((fmt, e.status_code, " ".join(_message(e).split())[:200]))
                    level = self.level = level + 1
                    continue  # the same request, in the next format, at once
                retries = getattr(self.client, "max_retries", 0)
                if client is self.client or not retries or not _retryable(e):
                    raise
                # Not a refusal: what is left of the client's retries, as if it had retried.
                return self.client.with_options(max_retries=retries - 1).chat.completions.create(
                    **kwargs), fmt


def proposal_schema(space, rationale_chars=160):
    """The schema of a constants proposal, {"changes": {...}, "rationale": "..."}, where
    "changes" names only searched constants, each with its allowed values (Space.json_schema),
    so an endpoint that enforces schemas can only answer inside the space. llama-cpp-python's
    grammar enforces the enums, the names and the rationale's length, not numeric bounds."""
    return {"type": "object", "additionalProperties": False, "required": ["changes", "rationale"],
            "properties": {"changes": space.json_schema(),
                           "rationale": {"type": "string", "maxLength": rationale_chars}}}
