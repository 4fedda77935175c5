"""How repeatable a time-budgeted run is, by the trainer's CPU threads, in the loop's own setting.

    python bench/threads.py [--budget 30] [--rounds 5] [--threads 2 1] [--set NAME=VALUE ...]

The baseline config (or the profile's defaults with --set's changes) runs through the real
runner (runner.run_trial: the real train.py, the fixed evaluation served from this process, as
the loop runs it) once per round for each thread count, interleaved (round k runs every thread
count with SEED k), so the machine's drift falls on each arm alike. It prints, per thread
count, the steps reached and val_bpb: mean, std between runs, and the range. On a time budget a
run's steps follow the machine's momentary speed, and its val_bpb follows its steps; this
measures how much of the loop's noise floor that is.
Run it alone on the machine (`uptime` first).
"""
import argparse
import ast
import os
import statistics
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
import prepare  # noqa: E402
from replay_record import record_one  # noqa: E402


def one_run(source, config, seed, threads, budget, data_dir, work):
    """(val_bpb, steps) of one run on this many trainer threads, as the replay table records it."""
    row = record_one(source, config, seed, budget, data_dir, work,
                     env={"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})
    if row["error"]:
        raise SystemExit(f"threads {threads}, SEED {seed}: {row['error']}")
    return row["val_bpb"], int(row["num_steps"])


def _setting(text):
    name, sep, value = text.partition("=")
    if not sep:
        raise SystemExit(f"--set {text!r}: write NAME=VALUE")
    return name, ast.literal_eval(value)


def spread(values, digits):
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return (f"{statistics.mean(values):.{digits}f} +- {sd:.{digits}f} "
            f"({min(values):.{digits}f}-{max(values):.{digits}f})")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget", type=float, default=30.0)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    ap.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE",
                    help="constants changed from the profile's defaults: DEVICE_BATCH_SIZE=8")
    ap.add_argument("--data-dir", default=None, help="a prepared dataset (default: current)")
    args = ap.parse_args(argv)
    data = prepare.load_prepared(args.data_dir)
    config = dict(_setting(text) for text in args.set)
    with open(os.path.join(ROOT, "train.py")) as f:
        source = f.read()
    print(f"profile {data.profile.name}, config {config or 'the defaults'}, budget "
          f"{args.budget:g} s, {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}", flush=True)
    runs = {t: [] for t in args.threads}
    with tempfile.TemporaryDirectory() as work:
        for seed in range(1, args.rounds + 1):
            for t in args.threads:
                bpb, steps = one_run(source, config, seed, t, args.budget, data.dir, work)
                runs[t].append((bpb, steps))
                print(f"SEED {seed} threads {t}: val_bpb {bpb:.4f} steps {steps} "
                      f"load {os.getloadavg()[0]:.2f}", flush=True)
    print("\n| threads | runs | steps: mean +- std (range) | val_bpb: mean +- std (range) |")
    print("|---|---|---|---|")
    for t, rs in runs.items():
        steps, bpbs = [s for _, s in rs], [b for b, _ in rs]
        print(f"| {t} | {len(rs)} | {spread(steps, 1)} | {spread(bpbs, 4)} |")
    print(f"load at the end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
