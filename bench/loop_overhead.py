"""Duty cycle of the loop: the share of its wall time spent training.

    python bench/loop_overhead.py [--trials 3] [--profile cpu] [--budget SECONDS]

Runs `loop.py --trials N` (baseline + N trials) in a scratch directory with copies of train.py
and search_space.yaml, on the prepared data of the profile (prepared first if needed), then
prints sum(training_seconds) / wall time of the whole loop process, and the per-trial overhead.
"""
import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import pandas as pd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import prepare  # noqa: E402


def summary_value(log_path, key):
    """The last `key: value` of a trial's summary block."""
    with open(log_path) as f:
        return float(re.findall(rf"^{key}:\s+(\S+)", f.read(), re.M)[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--profile", default="cpu", choices=list(prepare.PROFILES))
    ap.add_argument("--budget", type=float, help="override TIME_BUDGET (default: the profile's)")
    args = ap.parse_args()
    profile = prepare.PROFILES[args.profile]
    source = prepare.python_source() if profile.source == "python" else prepare.synthetic_source()
    data = prepare.prepare(profile, source, prepare.cache_dir(), log=lambda *a: None)
    work = tempfile.mkdtemp(prefix="loop-bench-")
    for name in ("train.py", "search_space.yaml"):
        shutil.copy(os.path.join(ROOT, name), work)
    cmd = [sys.executable, os.path.join(ROOT, "loop.py"), "--trials", str(args.trials)]
    if args.budget:
        cmd += ["--budget", str(args.budget)]
    env = dict(os.environ, AUTORESEARCH_DATA=data)
    t0 = time.time()
    subprocess.run(cmd, cwd=work, env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.time() - t0
    df = pd.read_csv(os.path.join(work, "results.tsv"), sep="\t")
    train = df.training_seconds.sum()
    print(f"profile {args.profile}  budget {args.budget or profile.time_budget:g}s  trials "
          f"{len(df)} (baseline + {len(df) - 1})  statuses {df.status.value_counts().to_dict()}")
    startup, evaluation = (statistics.mean(summary_value(os.path.join(work, log), key)
                                           for log in df.log[df.status != "crash"])
                           for key in ("startup_seconds", "eval_seconds"))
    inside = (df.total_seconds - df.training_seconds).mean()
    outside = (wall - df.total_seconds.sum()) / len(df)
    print(f"wall {wall:.1f}s  training {train:.1f}s  duty cycle {100 * train / wall:.1f}%  "
          f"overhead {(wall - train) / len(df):.1f}s per trial:")
    print(f"  {inside:.1f}s inside train.py (mean startup_seconds {startup:.1f}s, eval_seconds "
          f"{evaluation:.1f}s)")
    print(f"  {outside:.1f}s outside it: the interpreter's start before train.py's clock, and the "
          f"loop (its own start-up shared out, patching, spawning, reading the log, judging, "
          f"the ledger)")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
