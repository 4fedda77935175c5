"""
loop.py: improve train.py overnight, one trial at a time, every trial in results.tsv.

    python loop.py                      # until Ctrl-C: baseline first, then greedy steps
    python loop.py --trials 20 --strategy random
    python loop.py --hours 8 --git --tag nov22
    python loop.py --strategy llm --llm-scope code   # the LLM edits train.py's code too
    python loop.py --dry-run --trials 5 # the candidates it would run; runs nothing
    python loop.py report               # summary of results.tsv, and progress.png

It needs prepared data (python prepare.py). train.py always holds the best configuration so
far; each candidate runs from its own copy under runs/<trial>/. Restarting resumes: numbering
continues and train.py is restored to the best recorded trial if it drifted.
"""
import argparse
import os
import sys

from autoresearch.driver import Driver, LoopError, Settings
from autoresearch.ledger import LedgerError
from autoresearch.patch import PatchError
from autoresearch.proposers import STRATEGIES
from autoresearch.space import SpaceError

USER_ERRORS = (LoopError, LedgerError, PatchError, SpaceError)


def report_main(argv):
    from autoresearch import report
    ap = argparse.ArgumentParser(prog="loop.py report", description="Summarise a results.tsv.")
    ap.add_argument("--results", default="results.tsv")
    ap.add_argument("--plot", default=None, help="PNG to write (default: progress.png beside "
                    "the results file)")
    ap.add_argument("--top", type=int, default=5)
    args = ap.parse_args(argv)
    try:
        df = report.load_results(args.results)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.format_summary(report.summarize(df, top=args.top)))
    plot = args.plot or os.path.join(os.path.dirname(os.path.abspath(args.results)), "progress.png")
    print(f"plot: {report.plot_progress(df, plot)}")
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["report"]:
        return report_main(argv[1:])
    ap = argparse.ArgumentParser(description="Improve train.py's constants overnight.")
    ap.add_argument("--trials", type=int, help="stop after this many trials (default: run until "
                    "Ctrl-C or --hours)")
    ap.add_argument("--hours", type=float, help="start no trial after this many hours")
    ap.add_argument("--strategy", default="greedy", choices=STRATEGIES)
    ap.add_argument("--space", default="search_space.yaml")
    ap.add_argument("--results", default="results.tsv")
    ap.add_argument("--train", default="train.py")
    ap.add_argument("--seed", type=int, default=0, help="the proposer's random seed")
    ap.add_argument("--min-delta", type=float, default=0.0,
                    help="keep only if val_bpb beats the best by more than this")
    ap.add_argument("--budget", type=float, help="seconds per trial instead of the profile's "
                    "TIME_BUDGET (quick looks; results are then not comparable with others)")
    ap.add_argument("--git", action="store_true", help="commit each keep on autoresearch/<tag>")
    ap.add_argument("--tag", help="branch tag for --git (default: today, e.g. nov22)")
    ap.add_argument("--dry-run", action="store_true", help="print the candidates, run nothing")
    llm = ap.add_argument_group("llm strategy (any OpenAI-compatible endpoint)")
    llm.add_argument("--llm-base-url", help="e.g. http://localhost:11434/v1 for Ollama "
                     "(default: $OPENAI_BASE_URL, else OpenAI)")
    llm.add_argument("--llm-model", help="default: $AUTORESEARCH_LLM_MODEL, else gpt-4o-mini")
    llm.add_argument("--llm-key-env", default="OPENAI_API_KEY",
                     help="environment variable holding the key (never written anywhere)")
    llm.add_argument("--llm-timeout", type=float, default=60.0, help="seconds per request")
    llm.add_argument("--llm-max-calls", type=int, default=200, help="requests per run, at most")
    llm.add_argument("--llm-max-tokens", type=int, default=2_000_000, help="tokens per run, at most")
    llm.add_argument("--llm-fraction", type=float, default=0.3,
                     help="centaur: share of trials the LLM proposes (CMA-ES the rest)")
    llm.add_argument("--llm-scope", default="params", choices=["params", "code"],
                     help="llm: change the constants only (default), or edit train.py's code "
                     "with search/replace edits (the metric, budget and summary stay fixed)")
    args = ap.parse_args(argv)
    if args.trials is not None and args.trials < 0:
        ap.error("--trials must be >= 0")
    if args.llm_scope == "code" and args.strategy != "llm":
        ap.error("--llm-scope code needs --strategy llm")

    settings = Settings(train_path=args.train, space_path=args.space, results_path=args.results,
                        strategy=args.strategy, seed=args.seed, min_delta=args.min_delta,
                        git=args.git, tag=args.tag, time_budget=args.budget,
                        llm=dict(base_url=args.llm_base_url, model=args.llm_model,
                                 key_env=args.llm_key_env, timeout=args.llm_timeout,
                                 max_calls=args.llm_max_calls, max_tokens=args.llm_max_tokens,
                                 **({"llm_fraction": args.llm_fraction}
                                    if args.strategy == "centaur" else {"scope": args.llm_scope})))
    try:
        driver = Driver(settings)
        if args.dry_run:
            for cand in driver.dry_run(args.trials or 5):
                print(f"{cand.description}")
            return 0
        print(f"profile {driver.profile.name} | data {driver.data.meta['name']} | strategy "
              f"{args.strategy} | budget {driver.budget:g}s (limit {driver.time_limit:g}s) | "
              f"{len(driver.rows)} trial(s) in {args.results}", flush=True)
        driver.run(trials=args.trials, hours=args.hours)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: a trial that was running was stopped and recorded as a crash "
              "(interrupted); train.py holds the best so far", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
