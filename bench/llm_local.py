"""The local model as the LLM strategies' endpoint: how fast it answers, and how many of its
proposals are usable with the free-form schema of before and the constrained one of issue 12.

    python bench/llm_local.py [--model PATH] [--proposals 20] [--profile cpu] [--results results.tsv]

Starts llama-cpp-python's server on the model (default: the 135M test model, fetched once), then:
- speed: prompt processing (a fresh 1,500-token prompt, 1 token out) and generation (a short
  prompt, 200 tokens out, no grammar), in tokens/s;
- today's proposer against it, as it was before issue 12 (json_schema only);
- N constants proposals through autoresearch.chat with the free-form schema ({"changes":
  object}) and N with proposal_schema(space), each parsed and checked by the LLM proposer's own
  parser, with its one repair round: valid at once, valid after the repair, or fallen back (why);
  answers capped at 400 tokens (uncapped, the free-form schema let the 135M model write until
  its context was full);
- the size of code mode's prompt (train.py inside) in the model's tokens, against its context;
- with --results, the size of one run's curve line (autoresearch.curves) in characters and tokens.
The prompts are the proposer's own, with the history of --results (a results.tsv of the same
profile; none: the baseline only).
"""
import argparse
import collections
import json
import os
import statistics
import sys
import time

import pandas as pd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import prepare  # noqa: E402
from autoresearch import local_llm  # noqa: E402
from autoresearch.chat import BudgetSpent, Chat, proposal_schema  # noqa: E402
from autoresearch.curves import curve_of_log  # noqa: E402
from autoresearch.patch import read_constants  # noqa: E402
from autoresearch.space import PROFILE_NAMES, load_space  # noqa: E402

try:  # the LLM proposer moves into a package
    from autoresearch.proposers import llm as llm_module  # noqa: E402
except ImportError:
    from autoresearch import llm as llm_module  # noqa: E402


ANSWER_TOKENS = 400  # a constants answer is under 200 tokens; the cap stops a rambling one


def load(profile_name, results):
    profile = prepare.PROFILES[profile_name]
    with open(os.path.join(ROOT, "train.py")) as f:
        source = f.read()
    best = {n: (profile.train[n] if v is None and n in profile.train else v)
            for n, v in read_constants(source).items()}
    context = best | dict(zip(PROFILE_NAMES, (profile.max_seq_len, profile.time_budget,
                                              profile.eval_tokens, profile.vocab_size)))
    space = load_space(os.path.join(ROOT, "search_space.yaml"), profile_name, context)
    rows = pd.read_csv(results, sep="\t", dtype=str).fillna("").to_dict("records") if results else []
    if rows:  # the best kept configuration is what the proposer would start from
        keeps = [r for r in rows if r["status"] == "keep"]
        params = json.loads(min(keeps, key=lambda r: float(r["val_bpb"]))["params"])
        best |= {k: tuple(v) if isinstance(v, list) else v for k, v in params.items()}
    else:
        rows = [{"status": "keep", "val_bpb": "1.776000", "description": "baseline",
                 "params": json.dumps({k: list(v) if isinstance(v, tuple) else v
                                       for k, v in best.items() if k in space.params}),
                 "error": ""}]
    best = {k: best[k] for k in space.params} | {k: v for k, v in best.items() if k not in space.params}

    def check(params, source=None):
        broken = space.violations(context | params)
        return f"breaks the constraint(s) {'; '.join(broken)}" if broken else None
    return space, best, rows, source, check


def speed(chat):
    filler = " ".join(f"token{i} value{i * 7 % 13}" for i in range(400))
    t0 = time.monotonic()
    r = chat.client.chat.completions.create(model=chat.model, max_tokens=1, messages=[
        {"role": "user", "content": f"Read this list: {filler}. Say ok."}])
    prompt_rate = r.usage.prompt_tokens / (time.monotonic() - t0)
    t0 = time.monotonic()
    r = chat.client.chat.completions.create(model=chat.model, max_tokens=200, temperature=0.7,
                                            messages=[{"role": "user", "content":
                                                       "Write a long story about a robot."}])
    gen_rate = r.usage.completion_tokens / (time.monotonic() - t0)
    return prompt_rate, gen_rate, r.usage.completion_tokens


def proposals(proposer, chat, schema, best, rows, n):
    """n proposals the way the proposer makes them: outcome counts, reasons, tokens, seconds."""
    outcomes, reasons, tokens, seconds, formats = collections.Counter(), collections.Counter(), [], [], set()
    for _ in range(n):
        messages = [{"role": "system", "content": llm_module.SYSTEM},
                    {"role": "user", "content": proposer.prompt(best, rows)}]
        used_tokens = used_seconds = 0
        for attempt in ("valid", "valid after repair"):
            reply = chat.complete(messages, schema, answer_tokens=ANSWER_TOKENS)
            used_tokens += reply.tokens
            used_seconds += reply.seconds
            formats.add(reply.format)
            try:
                proposer.parse(reply.text, best)
                outcomes[attempt] += 1
                break
            except llm_module.LLMError as e:
                problem = str(e)
                messages += [{"role": "assistant", "content": reply.text or "(empty)"},
                             {"role": "user", "content": f"That answer cannot be used: {problem}. "
                                                         f"Answer again with one valid JSON object."}]
        else:
            outcomes["fell back"] += 1
            reasons[_kind(problem)] += 1
        tokens.append(used_tokens)
        seconds.append(used_seconds)
    return outcomes, reasons, tokens, seconds, formats


def _kind(problem):
    """A reason with its values left out, so that alike reasons count together."""
    for key in ("is outside", "is not one of", "is not in the search space", "must be",
                "leave the configuration", "constraint", "no JSON object", "expected", "empty"):
        if key in problem:
            return key
    return problem[:60]


def today(space, url, model, best, rows, check, n):
    """The proposer as it was before issue 12 against this server: how its trials ended."""
    proposer = llm_module.LLMProposer(space, base_url=url, model=model, timeout=120)
    if hasattr(proposer, "chat"):
        return None  # the proposer negotiates already: the rows above are what it does
    proposer.check = check
    out = collections.Counter()
    for _ in range(n):
        cand = proposer.propose(best, rows)
        out[cand.description.split(";")[0] if cand.meta.get("fallback") else "valid"] += 1
        proposer.tell(cand, {})
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="a GGUF file (default: the 135M test model)")
    ap.add_argument("--proposals", type=int, default=20)
    ap.add_argument("--profile", default="cpu", choices=list(prepare.PROFILES))
    ap.add_argument("--results", help="a results.tsv of this profile for the prompts' history")
    ap.add_argument("--threads", type=int)
    args = ap.parse_args()
    model = args.model or local_llm.fetch_default_model()
    space, best, rows, source, check = load(args.profile, args.results)
    with local_llm.serve(model, threads=args.threads) as server:
        chat = Chat(base_url=server.url, model=server.model, timeout=300, max_retries=0,
                    log=lambda m: print(m, file=sys.stderr))
        prompt_rate, gen_rate, gen_tokens = speed(chat)
        print(f"model {os.path.basename(model)}, {args.threads or max(1, (os.cpu_count() or 1) // 2)} threads; "
              f"prompt {prompt_rate:.0f} tokens/s, generation {gen_rate:.1f} tokens/s "
              f"({gen_tokens} tokens)")
        before = today(space, server.url, server.model, best, rows, check, min(args.proposals, 3))
        if before is not None:
            print(f"before issue 12 (json_schema only), {sum(before.values())} proposals: {dict(before)}")
        proposer = llm_module.LLMProposer(space, client=object())
        proposer.check = check
        table = []
        for name, schema in (("free-form (before)", llm_module.SCHEMA),
                             ("constrained (after)", proposal_schema(space))):
            out, reasons, tokens, seconds, formats = proposals(proposer, chat, schema, best, rows,
                                                               args.proposals)
            n = sum(out.values())
            table.append({"schema": name, "format": "/".join(sorted(formats)), "proposals": n,
                          "valid": f"{out['valid'] / n:.0%}",
                          "after repair": f"{out['valid after repair'] / n:.0%}",
                          "fell back": f"{out['fell back'] / n:.0%}",
                          "s/proposal": f"{statistics.mean(seconds):.1f}",
                          "tokens/proposal": round(statistics.mean(tokens)),
                          "fallback reasons": ", ".join(f"{k} {v}" for k, v in reasons.most_common())})
        print(f"{args.profile} space ({len(space.params)} constants), history of {len(rows)} rows")
        print(pd.DataFrame(table).to_string(index=False))
        code = llm_module.LLMProposer(space, scope="code", client=object())
        text = code.prompt_code(best, rows, source)
        try:
            t0 = time.monotonic()
            r = chat.client.with_options(timeout=1800).chat.completions.create(model=chat.model, max_tokens=1, messages=[
                {"role": "system", "content": llm_module.SYSTEM_CODE}, {"role": "user", "content": text}])
            print(f"code mode's prompt: {r.usage.prompt_tokens} tokens ({len(text)} characters of "
                  f"user prompt) in a context of {local_llm.DEFAULT_CONTEXT}, read in "
                  f"{time.monotonic() - t0:.0f} s")
        except Exception as e:  # the context is too small: say so
            print(f"code mode's prompt ({len(text)} characters) did not fit: {e}")
    if args.results:
        curve_sizes(args.results, model)
    return 0


def curve_sizes(results, model):
    """What one run's curve line adds to a prompt, over the runs of a results.tsv."""
    from llama_cpp import Llama
    base = os.path.dirname(os.path.abspath(results))
    rows = pd.read_csv(results, sep="\t", dtype=str).fillna("")
    curves = [curve_of_log(os.path.join(base, log)) for log in rows["log"] if log]
    lines = [c.line() for c in curves if c is not None]
    if not lines:
        return
    vocab = Llama(model, vocab_only=True, verbose=False)
    tokens = [len(vocab.tokenize(line.encode(), add_bos=False)) for line in lines]
    print(f"curve line per run shown: {statistics.mean(map(len, lines)):.0f} characters, "
          f"{statistics.mean(tokens):.0f} tokens (SmolLM2's tokenizer; mean of {len(lines)} runs), "
          f"e.g. {lines[0]!r}")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BudgetSpent as e:
        sys.exit(str(e))
