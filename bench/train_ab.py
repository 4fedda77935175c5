"""Two versions of train.py side by side: val_bpb over several seeds, runs interleaved.

    python bench/train_ab.py A B [--seeds 1 2 3 4] [--steps N | --budget SECONDS]

A and B are files or git revisions (`HEAD~1`, `abc123`: that revision's train.py). Runs
A(seed 1), B(seed 1), A(seed 2), ... on the prepared data ($AUTORESEARCH_DATA or the cache's
current dataset), so both see the same machine load, and prints each run, each version's mean
and standard deviation, and the mean paired difference B - A with its standard error.
--steps trains a fixed number of steps (quality per step, unaffected by load; the seconds per
step are printed beside it); --budget a fixed time, as the loop does.
"""
import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def source(spec):
    if os.path.exists(spec):
        return open(spec).read()
    return subprocess.run(["git", "show", f"{spec}:train.py"], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout


def run(text, seed, args, workdir):
    text, n = re.subn(r"^SEED = .*$", f"SEED = {seed}", text, count=1, flags=re.M)
    assert n == 1, "no SEED line"
    path = os.path.join(workdir, "train.py")
    with open(path, "w") as f:
        f.write(text)
    env = dict(os.environ, PYTHONPATH=ROOT)
    if args.steps:
        env["AUTORESEARCH_STEPS"] = str(args.steps)
    if args.budget:
        env["AUTORESEARCH_TIME_BUDGET"] = str(args.budget)
    out = subprocess.run([sys.executable, path], cwd=workdir, env=env, capture_output=True,
                         text=True).stdout
    summary = dict(re.findall(r"^(\w+):\s+(\S+)$", out.split("\n---\n")[-1], re.M))
    if "val_bpb" not in summary:
        raise SystemExit(f"run failed:\n{out[-2000:]}")
    return float(summary["val_bpb"]), int(summary["num_steps"]), float(summary["training_seconds"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4])
    ap.add_argument("--steps", type=int)
    ap.add_argument("--budget", type=float)
    args = ap.parse_args()
    texts = {"A": source(args.a), "B": source(args.b)}
    results = {"A": [], "B": []}
    with tempfile.TemporaryDirectory() as work:
        for seed in args.seeds:
            for name in ("A", "B"):
                val, steps, secs = run(texts[name], seed, args, work)
                results[name].append(val)
                print(f"{name} seed {seed}: val_bpb {val:.4f}  steps {steps}  "
                      f"{1000 * secs / steps:.0f} ms/step  load {os.getloadavg()[0]:.1f}",
                      flush=True)
    for name, spec in (("A", args.a), ("B", args.b)):
        vals = results[name]
        print(f"{name} ({spec}): mean {statistics.mean(vals):.4f}  std "
              f"{statistics.stdev(vals) if len(vals) > 1 else 0:.4f}  n {len(vals)}")
    diffs = [b - a for a, b in zip(results["A"], results["B"])]
    se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
    print(f"B - A: {statistics.mean(diffs):+.4f} +- {se:.4f} (mean paired difference, its "
          f"standard error)")


if __name__ == "__main__":
    main()
