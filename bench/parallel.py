"""Parallel workers: what sharing one study costs per trial, against workers.

    python bench/parallel.py [--workers 1,2,4,8,16,32] [--seconds 2] [--trials 5]
                             [--scale 64,128,256] [--backends journal,sqlite,postgres]
    python bench/parallel.py --loop [--workers 1,2,4,8,16] [--seconds 10] [--trials 4]

--loop: the whole loop. Each worker is a real `loop.py --storage URL` process in its own
directory (a "machine"), greedy strategy, noise judge, with the fixture trainer that sleeps
--seconds (tests/fixtures/fake_train.py). Per worker, the span from the start of its first
trial to the end of its last; overhead per trial = span / trials - the trainer's own wall time
(its process, measured from the trial's files): everything the loop and the study add.

Each worker is a real process (tests/fixtures/storage_worker.py) that reserves a trial,
"trains" by sleeping --seconds, finishes it and rewrites results.tsv from the whole study, the
way a loop worker will. Workers start together; the figures are
  trials/hour                 all trials / wall time from start to the last finish
  efficiency                  trials/hour / (workers x 3600 / seconds): 1.0 = no overhead
  eff@330s                    330 / (330 + coordination): the same cost on a real trial
  coordination s/trial        reserve + finish + results.tsv sync, mean (and the slowest)
  cpu s                       the worker's own CPU time in those steps (the rest is waiting:
                              for the database, a lock, or a CPU core)
  load                        the machine's 1-minute load average when the row was printed
on SQLite (a file in a temp dir) and PostgreSQL (a throwaway server on 127.0.0.1, as in the
tests). --scale then simulates many workers (16 per process, as threads, each with its own
connections) with short trials against PostgreSQL, reading the study (rows()) instead of
writing a file. Last, the cost of reading and writing the results view against study size.
Sleep-trials measure the storage layer only, not the loop.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
from autoresearch.storage import SharedStudy, sync_results_tsv  # noqa: E402
from conftest import Postgres, postgres_bindir  # noqa: E402

WORKER = os.path.join(ROOT, "tests", "fixtures", "storage_worker.py")


def run_workers(url, workers, trials, seconds, threads=1, results=None):
    """Start `workers` workers (in processes of `threads` each), wait until all have opened the
    study, let them go together; return (wall seconds, finished events)."""
    work = tempfile.mkdtemp(prefix="bench-par-")
    go = os.path.join(work, "go")
    procs = []
    for i in range(workers // threads):
        cmd = [sys.executable, WORKER, url, "bench", "--worker", f"w{i}", "--trials",
               str(trials), "--seconds", str(seconds), "--threads", str(threads), "--go", go,
               "--heartbeat", "5", "--grace", "30"]
        if results:
            cmd += ["--results", results]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    opened = 0
    for p in procs:  # each process prints one "open" per thread
        while opened < workers:
            line = p.stdout.readline()
            if not line:
                raise SystemExit(f"worker died before opening: {p.stderr.read()[-3000:]}")
            if '"open"' in line:
                opened += 1
                if opened % threads == 0:
                    break
    t0 = time.time()
    open(go, "w").close()
    finished = []
    for p in procs:
        out, err = p.communicate()
        if p.returncode:
            raise SystemExit(f"worker failed: {err[-3000:]}")
        finished += [json.loads(x) for x in out.splitlines() if '"finished"' in x]
    wall = max(e["t"] for e in finished) - t0  # not the processes' exit
    assert len(finished) == workers * trials, (len(finished), workers * trials)
    assert len({e["number"] for e in finished}) == len(finished), "a trial number twice"
    return wall, finished


def location(backend, work, server, name):
    """A new study's place: the journal file (the loop's default), SQLite, or a PostgreSQL
    database of its own."""
    if backend == "journal":
        return os.path.join(work, "study.journal")
    if backend == "sqlite":
        return f"sqlite:///{work}/study.db"
    return server.create_database(f"{name}_{int(time.time() * 1000)}")


def report(backend, workers, trials, seconds, wall, finished):
    coord = [e["reserve"] + e["finish"] + e["sync"] for e in finished]
    ideal = workers * 3600 / seconds
    per_hour = len(finished) / wall * 3600
    # what the same coordination costs a trial of the h100 profile's 300 s (plus ~30 s of
    # start-up and evaluation)
    at300 = 330 / (330 + statistics.mean(coord))
    print(f"{backend:>8} {workers:>4} {per_hour:>10.0f} {ideal:>8.0f} {per_hour / ideal:>6.1%} "
          f"{at300:>7.2%} "
          f"{statistics.mean(coord):>8.3f} {max(coord):>7.3f} "
          f"{statistics.mean(e['reserve'] for e in finished):>7.3f} "
          f"{statistics.mean(e['finish'] for e in finished):>7.3f} "
          f"{statistics.mean(e['sync'] for e in finished):>7.3f} "
          f"{statistics.mean(e['cpu'] for e in finished):>7.3f} {os.getloadavg()[0]:>5.1f}",
          flush=True)


def header(title):
    print(f"\n{title}\n{'backend':>8} {'wkrs':>4} {'trials/h':>10} {'ideal':>8} {'eff':>6} "
          f"{'eff@330s':>7} "
          f"{'coord s':>8} {'max s':>7} {'reserve':>7} {'finish':>7} {'sync':>7} {'cpu s':>7} "
          f"{'load':>5}", flush=True)


def view_cost(url, sizes):
    """rows() and the results.tsv sync against study size: the first read in a process (every
    trial), then the next one after one more trial (incremental). The study is filled with
    finished rows through import_rows (one transaction per row, as finish leaves them)."""
    print(f"\nresults view against study size ({url.split(':')[0]})\n"
          f"{'trials':>7} {'first rows()':>12} {'next rows()':>11} {'sync tsv':>9}", flush=True)
    path = os.path.join(tempfile.mkdtemp(prefix="bench-view-"), "results.tsv")
    for size in sizes:
        name = f"view{size}"
        rows = [{"trial": i, "val_bpb": 1.5, "status": "discard", "config": f"c{i}",
                 "worker": "gpubox/cuda:3", "params": {"X": i, "Y": 0.1, "Z": "relu2"},
                 "runs": 1, "mean_bpb": 1.5, "strategy": "tpe", "seed": 42,
                 "description": "MATRIX_LR 0.04->0.05, DEPTH 8->10"} for i in range(size)]
        with SharedStudy(url, name, heartbeat_seconds=5, grace=30) as s:
            s.import_rows(rows)
            with SharedStudy(url, name, heartbeat_seconds=5, grace=30) as fresh:
                t0 = time.perf_counter()
                fresh.rows()
                first = time.perf_counter() - t0
                sync_results_tsv(fresh, path)
                n = s.reserve({"config": "extra"}, unique=())
                s.finish(n, {"trial": n, "val_bpb": 1.4, "status": "keep"}, 1.4)
                t0 = time.perf_counter()
                rows = fresh.rows()
                nxt = time.perf_counter() - t0
                n = s.reserve({"config": "extra2"}, unique=())
                s.finish(n, {"trial": n, "val_bpb": 1.4, "status": "keep"}, 1.4)
                t0 = time.perf_counter()
                sync_results_tsv(fresh, path)
                sync = time.perf_counter() - t0
            os.remove(path)
        print(f"{len(rows):>7} {first:>12.3f} {nxt:>11.4f} {sync:>9.4f}", flush=True)


def loop_workers(url, workers, trials, seconds, data_dir):
    """Real loop.py workers on one study; returns per-worker (span, trainer seconds, rows)."""
    import shutil
    from autoresearch.patch import patch_constants
    root = tempfile.mkdtemp(prefix="bench-loop-")
    fake = open(os.path.join(ROOT, "tests", "fixtures", "fake_train.py")).read()
    space = ("smoke:\n  mutate: [1, 2]\n  params:\n    MATRIX_LR: {low: 0.01, high: 0.32, log: true}\n"
             "    DEPTH: {choices: [1, 2, 3]}\n")
    procs, dirs = [], []
    for i in range(workers):
        work = os.path.join(root, f"m{i}")
        os.makedirs(work)
        open(os.path.join(work, "train.py"), "w").write(patch_constants(fake, {"SLEEP": seconds}))
        open(os.path.join(work, "search_space.yaml"), "w").write(space)
        dirs.append(work)
        procs.append(subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "loop.py"), "--storage", url, "--trials",
             str(trials), "--worker-slot", str(i), "--heartbeat", "5", "--lost-after", "60"],
            cwd=work, env=dict(os.environ, AUTORESEARCH_DATA=data_dir),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    for p in procs:
        if p.wait():
            raise SystemExit(f"a worker failed: {p.stderr.read()[-3000:]}")
    out = []
    for work in dirs:
        starts, ends, trainer = [], [], 0.0
        for d in os.listdir(os.path.join(work, "runs")):
            t0 = os.stat(os.path.join(work, "runs", d, "train.py")).st_mtime
            t1 = os.stat(os.path.join(work, "runs", d, "run.log")).st_mtime
            starts.append(t0)
            ends.append(t1)
            trainer += t1 - t0
        out.append((max(ends) - min(starts), trainer / len(starts), len(starts)))
    shutil.rmtree(root, ignore_errors=True)
    return out


def loop_report(backend, workers, trials, seconds, spans):
    trial_s = statistics.mean(t for _, t, _ in spans)
    overhead = statistics.mean(span / n - t for span, t, n in spans)
    wall = max(span for span, _, _ in spans)
    runs = sum(n for _, _, n in spans)
    per_hour = runs / wall * 3600
    ideal = workers * 3600 / trial_s
    print(f"{backend:>8} {workers:>4} {per_hour:>10.0f} {ideal:>8.0f} {per_hour / ideal:>6.1%} "
          f"{trial_s:>9.2f} {overhead:>10.3f} {330 / (330 + overhead):>8.2%} "
          f"{os.getloadavg()[0]:>5.1f}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--loop", action="store_true", help="real loop.py workers, fixture trainer")
    ap.add_argument("--workers", default="1,2,4,8,16,32")
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--backends", default="journal,sqlite,postgres")
    ap.add_argument("--scale", default="64,128,256", help="simulated workers ('' to skip)")
    ap.add_argument("--scale-seconds", type=float, default=1.0)
    ap.add_argument("--view-sizes", default="100,1000,3000", help="'' to skip")
    args = ap.parse_args()
    backends = args.backends.split(",")
    server = None
    if "postgres" in backends or args.scale:
        if postgres_bindir() is None:
            raise SystemExit("PostgreSQL binaries not found (apt-get install postgresql)")
        server = Postgres(postgres_bindir())
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, trials of {args.seconds} s, "
          f"{args.trials} per worker")
    if args.loop:
        import prepare
        cache = os.path.join(tempfile.gettempdir(), "bench-parallel-cache")
        if not os.path.exists(os.path.join(cache, "current")):
            assert prepare.main(["--profile", "smoke", "--synthetic-docs", "2000",
                                 "--cache-dir", cache]) == 0
        data_dir = os.path.join(cache, "prepared", open(os.path.join(cache, "current")).read().strip())
        print(f"\nthe loop: one loop.py process per worker\n{'backend':>8} {'wkrs':>4} "
              f"{'trials/h':>10} {'ideal':>8} {'eff':>6} {'trainer s':>9} {'overhead s':>10} "
              f"{'eff@330s':>8} {'load':>5}", flush=True)
        try:
            for backend in backends:
                for workers in [int(w) for w in args.workers.split(",")]:
                    work = tempfile.mkdtemp(prefix="bench-par-")
                    url = location(backend, work, server, f"l{workers}")
                    spans = loop_workers(url, workers, args.trials, args.seconds, data_dir)
                    loop_report(backend, workers, args.trials, args.seconds, spans)
        finally:
            if server:
                server.close()
        return
    try:
        if args.workers:
            header("one process per worker, results.tsv rewritten after every trial")
        for backend in backends if args.workers else []:
            for workers in [int(w) for w in args.workers.split(",")]:
                work = tempfile.mkdtemp(prefix="bench-par-")
                url = location(backend, work, server, f"w{workers}")
                wall, finished = run_workers(url, workers, args.trials, args.seconds,
                                             results=os.path.join(work, "results.tsv"))
                report(backend, workers, args.trials, args.seconds, wall, finished)
        if args.scale:
            header(f"simulated scale: 16 workers per process as threads, trials of "
                   f"{args.scale_seconds} s, rows() after every trial")
            for workers in [int(w) for w in args.scale.split(",")]:
                url = server.create_database(f"s{workers}_{int(time.time() * 1000)}")
                wall, finished = run_workers(url, workers, args.trials, args.scale_seconds,
                                             threads=16)
                report("postgres", workers, args.trials, args.scale_seconds, wall, finished)
        if args.view_sizes:
            sizes = [int(s) for s in args.view_sizes.split(",")]
            for backend in backends:
                url = location(backend, tempfile.mkdtemp(prefix="bench-view-"), server, "view")
                view_cost(url, sizes)
    finally:
        if server:
            server.close()


if __name__ == "__main__":
    main()
