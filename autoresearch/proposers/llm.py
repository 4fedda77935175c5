"""The LLM proposer: a chat model on any OpenAI-compatible endpoint suggests the next changes.

The prompt carries the search space, the incumbent, every configuration tried so far sorted by
its mean val_bpb with its run count and verdict (OPRO-style: the model sees what worked, and how
sure the loop is of it), the training curves of the best and latest runs, the noise floor, and
recent crashes with their reasons. The answer is asked for as JSON in the strongest
structured-output format the endpoint takes (chat.py negotiates it; the schema names every
searched constant with its allowed values, so an endpoint that enforces schemas answers inside
the space), parsed leniently (markdown fences, prose around it), and every value is checked
against the space and the constraints. A bad answer gets one repair round; then the trial falls back to a numeric
strategy and its description says so. The text of an answer is only ever data: values go into
train.py as literals through the syntax-tree patcher, never as code.

Endpoint, model and key: --llm-base-url / OPENAI_BASE_URL, --llm-model / AUTORESEARCH_LLM_MODEL,
the key from OPENAI_API_KEY (or the variable --llm-key-env names). The key lives only in the
client object: it is never logged, written, or passed to a training run.
"""
import json
import math

import re

from autoresearch import curves, edits
from autoresearch.chat import BudgetSpent, Chat, proposal_schema
from autoresearch.history import CODE_PREFIX, CODE_STRATEGY
from autoresearch.proposers.base import Candidate, Proposer, describe_changes
from autoresearch.proposers.simple import GreedyProposer

SYSTEM = """You tune the training recipe of a small GPT language model. Each trial trains for a
fixed time budget and reports val_bpb (validation bits per byte, lower is better). You propose
the next trial as changes to a few constants of the best configuration so far. Use only the
constants and values the search space allows. Answer with one JSON object:
{"changes": {"CONSTANT": value, ...}, "rationale": "one short sentence"}"""


SYSTEM_CODE = """You improve train.py, the training script of a small GPT language model. Each
trial trains for a fixed time budget and reports val_bpb (validation bits per byte, lower is
better). You propose the next trial as search/replace edits to the current best train.py: the
architecture, the optimizer, the schedule, or the constants. Rules: the data, the metric and the
time budget are fixed, so leave MAX_SEQ_LEN, TIME_BUDGET, load_prepared, the evaluate_bpb call
and the summary it prints as they are; keep each constant of the search space a one-line literal
within its allowed values; the file must stay valid Python. Each search text must occur exactly
once in train.py, copied exactly; keep edits small and focused. Answer with one JSON object:
{"edits": [{"search": "exact text", "replace": "new text"}], "rationale": "one short sentence"}"""

SCHEMA_CODE = {
    "type": "object", "additionalProperties": False, "required": ["edits", "rationale"],
    "properties": {"rationale": {"type": "string"}, "edits": {"type": "array", "items": {
        "type": "object", "additionalProperties": False, "required": ["search", "replace"],
        "properties": {"search": {"type": "string"}, "replace": {"type": "string"}}}}}}
SCOPES = ("params", "code")


class LLMError(Exception):
    """An answer that cannot be used, with a reason the model can act on."""


def describe_space(space):
    lines = []
    for name, p in space.params.items():
        if p.choices is not None:
            lines.append(f"- {name}: one of {json.dumps([list(c) if isinstance(c, tuple) else c for c in p.choices])}")
        else:
            kind = "integer" if p.integer else "number"
            lines.append(f"- {name}: {kind} from {p.low:g} to {p.high:g}{' (log scale)' if p.log else ''}")
    for text, _ in space.constraints:
        lines.append(f"- constraint: {text}")
    return "\n".join(lines)


def extract_json(text):
    """The first JSON object in text: bare, in a ``` fence, or with prose around it."""
    if not text or not text.strip():
        raise LLMError("the answer was empty")
    fenced = re.findall(r"```(?:json)?\s*(.*?)```", text, re.S)
    # strict=False: grammar-constrained local models put raw newlines inside strings
    decoder = json.JSONDecoder(strict=False)
    for candidate in fenced + [text]:
        for start in [m.start() for m in re.finditer(r"\{", candidate)]:
            try:
                obj, _ = decoder.raw_decode(candidate[start:])
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                return obj
    raise LLMError("no JSON object found in the answer")


def coerce(space, name, value):
    """value as the space's type for name, or LLMError saying what is allowed."""
    p = space.params.get(name)
    if p is None:
        raise LLMError(f"{name} is not in the search space (allowed: {', '.join(space.params)})")
    if p.choices is not None:
        if isinstance(value, list):
            value = tuple(value)
        for c in p.choices:
            if value == c and type(value) is type(c) or (isinstance(c, float) and isinstance(value, int)
                                                       and not isinstance(value, bool) and value == c):
                return c
        raise LLMError(f"{name}={value!r} is not one of the allowed choices")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise LLMError(f"{name}={value!r} must be a number")
    if p.integer:
        if value != int(value):
            raise LLMError(f"{name}={value!r} must be an integer")
        value = int(value)
    else:
        value = float(value)
    if not p.low <= value <= p.high:
        raise LLMError(f"{name}={value!r} is outside [{p.low:g}, {p.high:g}]")
    return value


class LLMProposer(Proposer):
    name = "llm"
    reads_curves = True

    def __init__(self, space, seed=0, base_url=None, model=None, key_env="OPENAI_API_KEY",
                 timeout=60.0, max_retries=3, max_calls=200, max_tokens=2_000_000,
                 history=30, scope="params", client=None, log=print):
        super().__init__(space, seed)
        if scope not in SCOPES:
            raise ValueError(f"llm scope must be one of {', '.join(SCOPES)}, not {scope!r}")
        self.scope = scope
        self.edits_code = scope == "code"
        self.fallback = GreedyProposer(space, seed)
        self.history = history
        self.chat = Chat(base_url, model, key_env, timeout, max_retries, max_calls, max_tokens,
                         client=client, log=log)
        self.model = self.chat.model
        self.schema = proposal_schema(space)  # every value the space allows, and only those
        self.gave_up = None     # why the current trial fell back to the numeric strategy
        self.context_note = ""  # extra context another strategy shares (centaur: CMA-ES state)
        self._asked = []        # the replies of the proposal being made

    @property
    def tokens(self):
        return self.chat.tokens

    # --- prompt ---------------------------------------------------------------------------------

    def history_lines(self, ctx):
        """Configurations best mean first, with their run counts and verdicts; recent crashes;
        the noise floor once repeats show it."""
        measured = sorted((c for c in ctx.configs.values() if c.n), key=lambda c: c.mean)
        crashes = [c for c in ctx.configs.values() if c.status == "crash"][-8:]
        code = self.scope == "code"  # then what changed is in the description, not the params
        incumbent_params = _jsonable(ctx.best)
        parts = [f"Configurations so far, best mean first ({len(measured)} measured, showing "
                 f"{min(len(measured), self.history)}): mean val_bpb, runs behind it, verdict, "
                 f"{'what changed' if code else 'configuration'}:"]
        shown = measured[:self.history]
        recent = sorted(measured, key=lambda c: c.last_trial)[-5:]
        with_curve = {c.id for c in shown[:5] + recent}  # the best and the latest: their curves
        for c in shown + [c for c in recent if c not in shown]:
            spread = f" +-{c.std:.4f}" if c.std is not None else ""
            verdict = {"keep": "kept", "retest": "racing"}.get(c.status, c.status)
            if _jsonable(c.params) == incumbent_params and c.status == "keep":
                verdict = "incumbent"
            what = c.description if code else json.dumps(_jsonable(c.params), sort_keys=True)
            parts.append(f"  {c.mean:.6f}{spread} over {c.n} run{'s' if c.n > 1 else ''}  "
                         f"{verdict:<9}  {what}")
            if c.id in with_curve and ctx.curves.get(c.id):
                parts.append(f"      {ctx.curves[c.id]}")
        if any(ctx.curves.get(c) for c in with_curve):
            parts.insert(1, f"  ({curves.LEGEND}; under the best and the latest)")
        if crashes:
            parts += ["", "Recent crashes (avoid what caused them):"]
            parts += [f"  {(c.errors or ['?'])[-1]}: "
                      f"{c.description if code else json.dumps(_jsonable(c.params), sort_keys=True)}"
                      for c in crashes]
        if ctx.running:
            parts += ["", "Being run now by other workers (their results are not in yet; do not "
                          "propose these again):"]
            parts += [f"  {j.get('description', '') if code else json.dumps(j.get('params'), sort_keys=True)}"
                      for j in ctx.running[:self.history]]
        if ctx.noise:
            parts += ["", f"Noise: the same configuration run again varies by about "
                          f"{ctx.noise.std:.6f} val_bpb (standard deviation over "
                          f"{ctx.noise.runs} repeated runs); differences smaller than that may be "
                          f"luck. Promising configurations are re-run before they are kept."]
        return parts

    def prompt(self, ctx):
        parts = [
            "Search space (constant: allowed values):", describe_space(self.space), "",
            _best_line("Best configuration so far", ctx), json.dumps(_jsonable(ctx.best)),
            "", *self.history_lines(ctx)]
        if self.context_note:
            parts += ["", self.context_note]
        parts += ["", "Propose the next trial: change 1 to 4 constants of the best configuration."]
        return "\n".join(parts)

    def prompt_code(self, ctx):
        parts = [
            "Search space of the constants block (constant: allowed values):",
            describe_space(self.space), "",
            _best_line("The current best train.py", ctx) if ctx.best_value is not None else
            "The current train.py (not measured yet):",
            "```python", ctx.source.rstrip("\n"), "```", "", *self.history_lines(ctx), "",
            "Propose the next trial: one focused change to train.py, as search/replace edits."]
        return "\n".join(parts)

    def ask(self, messages, schema, answer_tokens):
        try:
            reply = self.chat.complete(messages, schema, answer_tokens)
        except BudgetSpent as e:
            raise LLMError(str(e)) from None
        self._asked.append(reply)
        return reply.text

    # --- proposing ------------------------------------------------------------------------------

    def parse(self, text, ctx):
        """(params, real changes, rationale, None) from a constants answer."""
        obj = extract_json(text)
        changes = obj.get("changes", obj if "rationale" not in obj else None)
        if not isinstance(changes, dict) or not changes:
            raise LLMError('expected {"changes": {...}, "rationale": "..."} with at least one change')
        clean = {name: coerce(self.space, name, v) for name, v in changes.items()}
        params = dict(ctx.best) | clean
        real = {k: v for k, v in clean.items() if ctx.best.get(k) != v}
        if not real:
            raise LLMError("the changes leave the configuration as it is")
        reason = ctx.check(params)
        if reason:
            raise LLMError(reason)
        return params, real, _rationale(obj), None

    def parse_code(self, text, ctx):
        """(params, constants changed, rationale, edited source) from an edits answer."""
        obj = extract_json(text)
        base = ctx.source
        try:
            source = edits.apply_edits(base, obj.get("edits"))
            if source == base:
                raise edits.EditError("the edits leave train.py as it is")
            params = edits.check_edited(source, base, self.space, ctx.defaults)
        except edits.EditError as e:
            raise LLMError(str(e)) from None
        reason = ctx.check(params, source)
        if reason:
            raise LLMError(reason)
        changes = {k: v for k, v in params.items() if ctx.best.get(k) != v}
        return params, changes, _rationale(obj), source

    def propose(self, ctx):
        import openai
        if self.gave_up:  # this trial fell back already: do not spend more calls on it
            return self._fallback(ctx, self.gave_up)
        if self.scope == "code":
            messages = [{"role": "system", "content": SYSTEM_CODE},
                        {"role": "user", "content": self.prompt_code(ctx)}]
            schema, parse, answer_tokens = SCHEMA_CODE, self.parse_code, 4096
        else:
            messages = [{"role": "system", "content": SYSTEM},
                        {"role": "user", "content": self.prompt(ctx)}]
            schema, parse, answer_tokens = self.schema, self.parse, 400
        self._asked, problem = [], None
        prompt_chars = len(messages[1]["content"])
        for attempt in range(2):  # the answer, then one repair round
            text = ""
            try:
                text = self.ask(messages, schema, answer_tokens)
                params, changes, rationale, source = parse(text, ctx)
                cost = self._cost("repaired" if attempt else "valid", prompt_chars)
                spent = f"[{cost['tokens']} tokens, {cost['seconds']:.1f} s]"
                if source is None:
                    desc = f"llm: {rationale or describe_changes(changes, ctx.best)} {spent}"
                    return Candidate(params, changes, desc, cost=cost)
                patch, added, removed = edits.diff(ctx.source, source)
                desc = (f"{CODE_PREFIX} {rationale or 'an edit'} (+{added} -{removed} lines) "
                        f"{spent}")
                return Candidate(params, changes, desc, cost=cost, diff=patch,
                                 source=source, strategy=CODE_STRATEGY)
            except LLMError as e:
                problem = str(e)
                if problem.startswith("budget spent"):
                    break
                messages += [{"role": "assistant", "content": text or "(empty)"},
                             {"role": "user", "content": f"That answer cannot be used: {problem}. "
                                                         f"Answer again with one valid JSON object."}]
            except openai.OpenAIError as e:  # timeouts, 429/5xx after the client's retries
                problem = type(e).__name__
                break
        self.gave_up = problem
        cand = self._fallback(ctx, problem)
        cand.cost = self._cost("fallback", prompt_chars) | {"reason": problem}
        return cand

    def _cost(self, outcome, prompt_chars):
        """What this proposal cost and how it went, kept beside the trial's log."""
        asked = self._asked
        return {"outcome": outcome, "calls": len(asked),
                "tokens": sum(r.tokens for r in asked),
                "prompt_tokens": sum(r.prompt_tokens for r in asked),
                "seconds": round(sum(r.seconds for r in asked), 3),
                "format": asked[-1].format if asked else None, "prompt_chars": prompt_chars,
                "model": self.model}

    def tell(self, candidate, config):
        self.gave_up = None

    def reject(self, candidate, known=None):
        pass

    def _fallback(self, ctx, problem):
        cand = self.fallback.propose(ctx)
        cand.description = f"llm fallback ({problem[:80]}); greedy: {cand.description}"
        cand.meta["fallback"] = True
        return cand


def _jsonable(params):
    return {k: list(v) if isinstance(v, tuple) else v for k, v in params.items()}


def _best_line(what, ctx):
    if ctx.best_value is None:
        return f"{what} (not measured yet):"
    return f"{what} (val_bpb {ctx.best_value:.6f}, the mean of {ctx.best_runs} run{'s' if ctx.best_runs > 1 else ''}):"


def _rationale(obj):
    return " ".join(str(obj.get("rationale", "")).split())[:160]
