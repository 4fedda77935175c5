"""
loop.py: improve train.py overnight, one trial at a time, every trial in results.tsv.

    python loop.py                      # until Ctrl-C: the baseline (3 SEEDs), then greedy steps
                                        # (`loop.py run [flags]`: the same; run is the default)
    python loop.py --trials 20 --strategy random     # 20 runs (rows), re-runs included
    python loop.py --hours 8 --git --tag nov22
    python loop.py --strategy llm --llm-scope code   # the LLM edits train.py's code too
    python loop.py --judge threshold    # Karpathy's rule: keep one run that beats the best
    python loop.py --dry-run --trials 5 # the candidates it would run; runs nothing
    python loop.py report               # summary of results.tsv, and progress.png
    python loop.py recheck --runs 3     # re-run baseline and incumbent: how much gain survives?
    python loop.py dashboard            # watch the study live in a browser (optuna-dashboard)

It needs prepared data (python prepare.py). train.py always holds the incumbent; each run
trains its own copy under runs/<trial>/. A challenger is kept only when its mean over re-runs
beats the incumbent's mean with the confidence asked for. Restarting resumes, also in the middle
of a race: numbering continues and train.py is restored to the incumbent if it drifted.
"""
import argparse
import contextlib
import os
import signal
import sys

from autoresearch.config import sandbox_mode
from autoresearch.driver import Driver, LoopError, Settings
from autoresearch.ledger import LedgerError, StorageError
from autoresearch.patch import PatchError
from autoresearch.proposers import STRATEGIES
from autoresearch.space import SpaceError

USER_ERRORS = (LoopError, LedgerError, PatchError, SpaceError, StorageError)


def add_common(ap):
    ap.add_argument("--results", default="results.tsv")
    ap.add_argument("--train", default="train.py")
    ap.add_argument("--space", default="search_space.yaml")
    ap.add_argument("--budget", type=float, help="seconds per run instead of the profile's "
                    "TIME_BUDGET (quick looks; results are then not comparable with others)")


def build_parser():
    """loop.py's parser: `run` (the default when no command is named), `report`, `recheck`,
    `dashboard`."""
    ap = argparse.ArgumentParser(prog="loop.py", description="Improve train.py's recipe "
                                 "overnight; `loop.py [run] --help` for the loop's flags.")
    commands = ap.add_subparsers(dest="command", required=True)
    for name, add, main, about in (
            ("run", add_run_arguments, run_main, "Improve train.py's recipe overnight."),
            ("report", add_report_arguments, report_main, "Summarise a results.tsv."),
            ("recheck", add_recheck_arguments, recheck_main, "Re-run the baseline and the "
             "incumbent with fresh SEEDs: how much of the gain survives?"),
            ("dashboard", add_dashboard_arguments, dashboard_main, "Watch the study live: "
             "optuna-dashboard on the runs' study, until Ctrl-C.")):
        sub = commands.add_parser(name, help=about, description=about)
        add(sub)
        sub.set_defaults(main=main, parser=sub)
    return ap


def add_report_arguments(ap):
    ap.add_argument("--results", default="results.tsv")
    ap.add_argument("--plot", default=None, help="PNG to write (default: progress.png beside "
                    "the results file)")
    ap.add_argument("--top", type=int, default=5)


def add_recheck_arguments(ap):
    add_common(ap)
    ap.add_argument("--runs", type=int, default=3, help="fresh runs of each (default 3)")


def add_dashboard_arguments(ap):
    ap.add_argument("--results", default="results.tsv",
                    help="show the study beside it (results.journal)")
    ap.add_argument("--storage", help="the study's storage instead: a URL or a journal file")
    ap.add_argument("--study", default="autoresearch", help="the study's name in the storage")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; "
                    "0.0.0.0 shows it to other machines)")
    ap.add_argument("--port", type=int, default=8080, help="default 8080; 0: any free port")


def add_run_arguments(ap):
    ap.add_argument("--trials", type=int, help="stop after this many runs, every run counted "
                    "(baseline repeats and re-runs too; default: until Ctrl-C or --hours)")
    ap.add_argument("--hours", type=float, help="start no run after this many hours")
    ap.add_argument("--strategy", default="greedy", choices=STRATEGIES)
    add_common(ap)
    ap.add_argument("--seed", type=int, default=0, help="the proposer's random seed")
    add_judge_arguments(ap.add_argument_group("judge (when a change is kept)"))
    add_worker_arguments(ap.add_argument_group("many workers (one study shared through a database)"))
    ap.add_argument("--sandbox", choices=["auto", "on", "off"],
                    default=sandbox_mode(),
                    help="run each trial under bubblewrap: no network, no writes outside its "
                    "directory, no validation data (auto: where it works, else an announced "
                    "fallback; on: refuse to run without it; off: no isolation)")
    ap.add_argument("--git", action="store_true", help="commit each keep on autoresearch/<tag>")
    ap.add_argument("--tag", help="branch tag for --git (default: today, e.g. nov22)")
    ap.add_argument("--dry-run", action="store_true", help="print the candidates, run nothing")
    ap.add_argument("--grace", type=float, help="seconds a trial may run past its budget "
                    "(start-up, compile, evaluation) before it is killed as a timeout (default: "
                    "the larger of 60 and half the budget)")
    add_llm_arguments(ap.add_argument_group("llm strategy (any OpenAI-compatible endpoint)"))


def add_judge_arguments(judge):
    judge.add_argument("--judge", default="noise", choices=["noise", "threshold"],
                       help="noise (default): re-run promising configs and keep only a mean that "
                       "beats the incumbent's with --confidence; threshold: Karpathy's rule, one "
                       "run that beats the incumbent by --min-delta")
    judge.add_argument("--baseline-runs", type=int, default=Settings.baseline_runs,
                       help="runs of the baseline (SEEDs base, base+1, ...) before the first "
                       f"verdict, so the noise is known (default {Settings.baseline_runs})")
    judge.add_argument("--max-runs", type=int, default=3,
                       help="noise judge: runs a challenger gets at most (default 3)")
    judge.add_argument("--confidence", type=float, default=Settings.confidence,
                       help="noise judge: one-sided confidence a keep needs (default "
                       f"{Settings.confidence}, the replay of real runs' choice)")
    judge.add_argument("--drop", type=float, default=Settings.drop,
                       help="noise judge: discard a challenger after one run when its t is "
                       f"below this, instead of running it again (default {Settings.drop})")
    judge.add_argument("--min-delta", type=float, default=0.0,
                       help="threshold judge: keep only if val_bpb beats the incumbent by more")
    judge.add_argument("--first-confidence", type=float,
                       default=Settings.first_confidence,
                       help="noise judge: keep a first run at once when it is ahead with this "
                       "confidence (a challenger many sigma ahead needs no repeat); 0 turns it "
                       f"off (default {Settings.first_confidence})")
    judge.add_argument("--incumbent-rule", choices=["race", "close"],
                       default=Settings.incumbent_rule,
                       help="noise judge: re-run the incumbent at the start of every race, or "
                       "only while another run of it could change the verdict (default "
                       f"{Settings.incumbent_rule})")
    judge.add_argument("--prune", choices=["on", "off", "median", "wilcoxon"],
                       default=Settings.prune,
                       help="on: stop a challenger's first run when its smoothed loss trails the "
                       "incumbent's at the same progress by more than the noise there allows "
                       "(row status pruned); median, wilcoxon: Optuna's pruner of that name "
                       f"decides instead, over the study's curves (default {Settings.prune})")
    judge.add_argument("--prune-sigmas", type=float, default=Settings.prune_sigmas,
                       help="--prune on: how many times the noise at that progress a run must "
                       f"trail the incumbent by to be stopped (default {Settings.prune_sigmas})")
    judge.add_argument("--audit", type=float, default=Settings.audit,
                       help="share of runs the stopping rule would stop that run to the end "
                       "anyway, so `report` measures its false-prune rate (default "
                       f"{Settings.audit})")


def add_worker_arguments(many):
    many.add_argument("--workers", type=int, default=1,
                      help="run N loops on this machine, one per GPU (--gpus to choose), "
                      "sharing one study (default 1)")
    many.add_argument("--gpus", help="comma-separated GPU indices for --workers (default: all)")
    many.add_argument("--storage", help="the study every run is a trial of: by default Optuna's "
                      "journal file beside the results file (results.journal); name a shared "
                      "one with postgresql://user:pass@host/db (many machines), "
                      "sqlite:///path.db, or a journal file's path")
    many.add_argument("--study", default="autoresearch", help="the study's name in the storage")
    many.add_argument("--heartbeat", type=float, default=10.0,
                      help="seconds between a worker's heartbeats (default 10)")
    many.add_argument("--lost-after", type=float, default=60.0,
                      help="a trial whose worker sent no heartbeat for this long is recorded as "
                      "a crash `lost` (default 60)")
    many.add_argument("--worker-slot", type=int, help=argparse.SUPPRESS)


def add_llm_arguments(llm):
    llm.add_argument("--llm-base-url", help="e.g. http://localhost:11434/v1 for Ollama "
                     "(default: $OPENAI_BASE_URL, else OpenAI)")
    llm.add_argument("--llm-model", help="default: $AUTORESEARCH_LLM_MODEL, else gpt-4o-mini")
    llm.add_argument("--llm-gguf", metavar="PATH",
                     help="a local GGUF chat model: the loop serves it with llama.cpp on "
                     "127.0.0.1 for the run (no key, no network; needs llama-cpp-python[server])")
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


def check_run_arguments(ap, args):
    if args.trials is not None and args.trials < 0:
        ap.error("--trials must be >= 0")
    if args.llm_scope == "code" and args.strategy != "llm":
        ap.error("--llm-scope code needs --strategy llm")
    if args.llm_gguf and args.strategy not in ("llm", "centaur"):
        ap.error("--llm-gguf needs --strategy llm or centaur")
    if args.llm_gguf and args.llm_base_url:
        ap.error("--llm-gguf serves its own endpoint: leave out --llm-base-url")

    if args.max_runs < 2 and args.judge == "noise":
        ap.error("--max-runs must be >= 2 for the noise judge (a keep needs a repeat)")
    if args.workers < 1:
        ap.error("--workers must be >= 1")


def settings_of(args):
    """The driver's Settings from `run`'s flags."""
    return Settings(train_path=args.train, space_path=args.space, results_path=args.results,
                    strategy=args.strategy, seed=args.seed, judge=args.judge,
                    baseline_runs=args.baseline_runs, max_runs=args.max_runs,
                    confidence=args.confidence, min_delta=args.min_delta, drop=args.drop,
                    first_confidence=args.first_confidence or None,
                    incumbent_rule=args.incumbent_rule, prune=args.prune, audit=args.audit,
                    prune_sigmas=args.prune_sigmas,
                    git=args.git, tag=args.tag, time_budget=args.budget, grace=args.grace,
                    storage=args.storage, study=args.study, worker_slot=args.worker_slot,
                    sandbox=args.sandbox, dry_run=args.dry_run,
                    heartbeat_seconds=args.heartbeat, lost_after=args.lost_after,
                    llm=dict(base_url=args.llm_base_url, model=args.llm_model,
                             key_env=args.llm_key_env, timeout=args.llm_timeout,
                             max_calls=args.llm_max_calls, max_tokens=args.llm_max_tokens,
                             **({"llm_fraction": args.llm_fraction}
                                if args.strategy == "centaur" else {"scope": args.llm_scope})))


def report_main(args, argv):
    from autoresearch import report
    try:
        df = report.load_results(args.results)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results_dir = os.path.dirname(os.path.abspath(args.results))
    print(report.format_summary(report.summarize(df, top=args.top, results_dir=results_dir)))
    plot = args.plot or os.path.join(os.path.dirname(os.path.abspath(args.results)), "progress.png")
    print(f"plot: {report.plot_progress(df, plot)}")
    return 0


def recheck_main(args, argv):
    from autoresearch import report
    if args.runs < 1:
        args.parser.error("--runs must be >= 1")
    try:
        driver = Driver(Settings(train_path=args.train, space_path=args.space,
                                 results_path=args.results, time_budget=args.budget))
        result = driver.recheck(args.runs)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: the recheck runs so far are rows in the results", file=sys.stderr)
        return 130
    print(report.format_recheck(result))
    return 0


def dashboard_main(args, argv):
    from autoresearch import dashboard
    from autoresearch.storage import study_location
    location = study_location(args.results, args.storage)
    try:
        view = dashboard.Dashboard(location, args.host, args.port, args.study)
    except dashboard.DashboardError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"dashboard of {location}: {view.url}  (Ctrl-C stops it)", flush=True)
    try:
        view.serve()
    except KeyboardInterrupt:
        print("\ndashboard stopped", file=sys.stderr)
    return 0


def run_workers(args, argv):
    from autoresearch import workers
    from autoresearch.record import Record
    from autoresearch.storage import study_location
    storage = study_location(args.results, args.storage)
    try:
        gpus = [int(g) for g in args.gpus.split(",")] if args.gpus else None
        record = Record(args.results, storage, args.study)
        imported = record.import_results()  # before any worker writes to the study
        record.close()
        if imported:
            print(f"study {args.study!r} in {storage}: started from the {imported} run(s) of "
                  f"{args.results}")
        print(f"{args.workers} workers sharing study {args.study!r} in {storage}", flush=True)
        return workers.launch(argv, args.workers, storage, args.study, args.trials, gpus)
    except (ValueError, workers.WorkersError, StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run_main(args, argv):
    check_run_arguments(args.parser, args)
    if args.workers > 1 or args.gpus:
        return run_workers(args, argv)
    settings = settings_of(args)
    driver = None
    stack = contextlib.ExitStack()
    try:
        if args.llm_gguf:
            serve_local_llm(stack, settings, args.llm_gguf)
        driver = Driver(settings)
        if args.dry_run:
            for cand in driver.dry_run(args.trials or 5):
                print(f"{cand.description}")
            return 0
        print(f"profile {driver.profile.name} | data {driver.data.meta['name']} | strategy "
              f"{args.strategy} | judge {driver.judge.describe()} | stopping "
              f"{driver.stopping.describe()} | budget {driver.budget:g}s "
              f"(limit {driver.execution.time_limit:g}s) | {len(driver.rows)} run(s) in {args.results}",
              flush=True)
        driver.run(trials=args.trials, hours=args.hours, progress=args.worker_slot is None)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: a trial that was running was stopped and recorded as a crash "
              "(interrupted); train.py holds the best so far", file=sys.stderr)
        return 130
    finally:
        if driver is not None:
            driver.close()
        stack.close()
    return 0


def serve_local_llm(stack, settings, gguf):
    """Serve a local GGUF model with llama.cpp for the run; the LLM settings point at it."""
    from autoresearch import local_llm
    try:
        server = stack.enter_context(local_llm.serve(gguf))
    except local_llm.LocalLLMError as e:
        raise LoopError(str(e)) from None
    settings.llm |= {"base_url": server.url, "model": server.model}
    print(f"llm: {server.model} served by llama.cpp at {server.url}", flush=True)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    # A loop started with `&` from a script inherits SIGINT ignored, and Python then leaves it
    # so: `kill -INT` (how workers are stopped) would do nothing. Ctrl-C must always stop it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    named = argv[:1] in (["run"], ["report"], ["recheck"], ["dashboard"])
    args = build_parser().parse_args(argv if named else ["run", *argv])
    return args.main(args, argv)


if __name__ == "__main__":
    sys.exit(main())
