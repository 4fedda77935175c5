"""The record's cost per run and its durability under kill -9 (issue 19), on each backend.

    python bench/record.py [--runs 300] [--kills 30] [--backends journal,sqlite,postgres]
                           [--visible 3]

cost: what one worker's record does per run, as the loop does it: reserve a trial, report its
curve (50 points, one per 2% of the budget: train.py's progress lines), finish it with its row
and details (verdict, log tail, diff), and rewrite results.tsv as the study's view. Beside it,
what the loop did before the study: one results line appended under flock and fsynced.
Printed: the median seconds per run over the first and the last 50 runs of a growing study.

kill: a worker process records runs back to back through the same Record, printing each trial's
number once finish() returned; it is killed with SIGKILL at a random instant, then a new one is
started, --kills times. A run is lost when a worker said it was finished and the study (or
results.tsv) does not hold it. Each restart must also open the study, and results.tsv must
parse, after every kill. PostgreSQL runs a throwaway server (tests/conftest.py's), skipped
where its binaries are missing.

visible: from `loop.py` started (smoke profile, the real train.py, 10 s budget) to its first
trial on the dashboard: `loop.py dashboard`'s server (autoresearch/dashboard.py) started as
soon as the study exists, and its API asked every 0.1 s until the study lists a trial.
"""
import argparse
import fcntl
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from autoresearch import ledger  # noqa: E402
from autoresearch.record import Record  # noqa: E402

POINTS = 50
DETAILS = {"verdict": "discard: t = -1.2 over 2 runs", "purpose": "new", "kind": "params",
           "log_tail": "step 100 | progress 1.00 | loss 3.1 ...\n" * 40,
           "diff": "-MATRIX_LR = 0.04\n+MATRIX_LR = 0.08\n" * 3}


def row(trial):
    return {"commit": "abc1234", "val_bpb": 1.0 + trial / 1e4, "memory_gb": 1.0,
            "status": "discard", "description": f"run {trial}", "trial": trial,
            "started_at": ledger.now_iso(), "strategy": "bench", "profile": "cpu", "seed": 42,
            "changes": {"MATRIX_LR": 0.08}, "params": {"MATRIX_LR": 0.08, "DEPTH": 4},
            "training_seconds": 30.0, "total_seconds": 33.0, "mfu_percent": 0.0,
            "num_steps": 100, "total_tokens_M": 1.0, "num_params_M": 3.4, "error": "",
            "log": f"runs/{trial:04d}/run.log", "config": f"c{trial}", "runs": 1,
            "mean_bpb": 1.0, "worker": "bench"}


def one_run(record, k):
    trial = record.reserve({"config": f"c{k}-{os.getpid()}", "purpose": "new", "seed": 42,
                            "params": {"MATRIX_LR": 0.08}}, [])
    for p in range(1, POINTS + 1):
        record.report(trial, p / POINTS, 4.0 - p / POINTS)
    record.finish(trial, row(trial), DETAILS)
    record.rows()
    return trial


def append_line(path, trial):
    """What the loop did per run before the study: one line, flock, write, fsync."""
    line = ledger.format_row(row(trial)).encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def cost(locations, runs, work):
    out = {}
    path = os.path.join(work, "append", "results.tsv")
    os.makedirs(os.path.dirname(path))
    times = []
    for k in range(runs):
        t0 = time.perf_counter()
        append_line(path, k)
        times.append(time.perf_counter() - t0)
    out["append (before)"] = times
    for name, location in locations.items():
        results = os.path.join(work, f"cost-{name}", "results.tsv")
        record = Record(results, location(results))
        times = []
        for k in range(runs):
            t0 = time.perf_counter()
            one_run(record, k)
            times.append(time.perf_counter() - t0)
        record.close()
        out[name] = times
    print(f"\ncost per run ({runs} runs: reserve, {POINTS} curve points, finish, the view)")
    print("| record | first 50 runs, median s | last 50 runs, median s |")
    print("|---|---|---|")
    for name, times in out.items():
        print(f"| {name} | {statistics.median(times[:50]):.4f} | "
              f"{statistics.median(times[-50:]):.4f} |")
    return out


def worker(results, location):
    """Record runs until killed; say each finished trial on stdout."""
    record = Record(results, location or None)
    k = 0
    while True:
        trial = one_run(record, k)
        print(trial, flush=True)
        k += 1


def kill(locations, kills, work, seed=0):
    rng = random.Random(seed)
    print(f"\nkill -9 at a random instant, {kills} times per backend")
    print("| record | runs said finished | runs in the study | lost | lost-trial crash rows "
          "| restarts that failed to open |")
    print("|---|---|---|---|---|---|")
    for name, location in locations.items():
        results = os.path.join(work, f"kill-{name}", "results.tsv")
        os.makedirs(os.path.dirname(results))
        said, failed_opens = set(), 0
        for _ in range(kills):
            proc = subprocess.Popen([sys.executable, __file__, "--worker", results,
                                     location(results) or ""],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            time.sleep(rng.uniform(0.5, 2.5))
            proc.send_signal(signal.SIGKILL)
            out, err = proc.communicate()
            said |= {int(line) for line in out.split()}
            if not out.strip() and "Traceback" in err:
                failed_opens += 1
                print(err[-1500:], file=sys.stderr)
        record = Record(results, location(results))
        rows = record.rows()  # also the view, after the last kill
        record.close()
        held = {int(r["trial"]) for r in rows if r["status"] != "crash"}
        lost_rows = sum(r["error"] == "lost" for r in rows)
        tsv = {int(r["trial"]) for r in ledger.Ledger(results).rows() if r["status"] != "crash"}
        assert tsv == held, "results.tsv is not the study's view"
        print(f"| {name} | {len(said)} | {len(held)} | {len(said - held)} | {lost_rows} | "
              f"{failed_opens} |")


def visible(times, work):
    import json
    import urllib.request

    import prepare
    from autoresearch import dashboard
    from autoresearch.storage import study_location
    cache = os.path.join(work, "cache")
    with open(os.devnull, "w") as quiet:
        streams, sys.stdout, sys.stderr = (sys.stdout, sys.stderr), quiet, quiet
        try:
            prepare.main(["--profile", "smoke", "--synthetic-docs", "1500", "--cache-dir", cache])
        finally:
            sys.stdout, sys.stderr = streams
    data = os.path.join(cache, "prepared", open(os.path.join(cache, "current")).read().strip())
    print(f"\nfrom `loop.py` started to its first trial on the dashboard ({times} times)")
    print("| try | study file exists, s | dashboard up, s | first trial listed, s | its state |")
    print("|---|---|---|---|---|")
    for k in range(times):
        run = os.path.join(work, f"visible{k}")
        os.makedirs(run)
        for name in ("train.py", "search_space.yaml"):
            shutil.copy(os.path.join(ROOT, name), run)
        location = study_location(os.path.join(run, "results.tsv"))
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "loop.py"), "--trials", "1",
                                 "--budget", "10"], cwd=run, env=os.environ | {
                                     "AUTORESEARCH_DATA": data},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        view = exists = up = None
        try:
            while view is None:
                if exists is None and os.path.exists(location):
                    exists = time.perf_counter() - t0
                try:
                    view = dashboard.start(location, port=0)
                except dashboard.DashboardError:
                    time.sleep(0.1)
            up = time.perf_counter() - t0
            while True:
                with urllib.request.urlopen(
                        f"http://127.0.0.1:{view.port}/api/studies/0?after=0") as r:
                    trials = json.load(r)["trials"]
                if trials:
                    listed = time.perf_counter() - t0
                    break
                time.sleep(0.1)
            print(f"| {k + 1} | {exists or up:.1f} | {up:.1f} | {listed:.1f} | "
                  f"{trials[0]['state']} |")
        finally:
            if view is not None:
                view.stop()
            proc.wait(timeout=300)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=300)
    ap.add_argument("--kills", type=int, default=30)
    ap.add_argument("--backends", default="journal,sqlite,postgres")
    ap.add_argument("--visible", type=int, default=3, help="times to measure start to visible")
    ap.add_argument("--worker", nargs=2, metavar=("RESULTS", "LOCATION"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(*args.worker)
    work = tempfile.mkdtemp(prefix="bench-record-")
    server = None
    try:
        locations = {}
        for name in args.backends.split(","):
            if name == "journal":
                locations[name] = lambda results: None  # the default: results.journal
            elif name == "sqlite":
                locations[name] = lambda results: "sqlite:///" + results[:-4] + ".db"
            elif name == "postgres":
                from conftest import Postgres, postgres_bindir
                if postgres_bindir() is None:
                    print("postgres: no initdb/pg_ctl here, skipped")
                    continue
                server = Postgres(postgres_bindir())
                made = {}  # results path -> its own database

                def database(results, made=made):
                    if results not in made:
                        made[results] = server.create_database(f"bench{len(made)}")
                    return made[results]
                locations[name] = database
            else:
                raise SystemExit(f"unknown backend {name!r}")
        print(f"load: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} (1 and 5 min)")
        cost(locations, args.runs, work)
        kill(locations, args.kills, work)
        if args.visible:
            visible(args.visible, work)
    finally:
        if server is not None:
            server.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
