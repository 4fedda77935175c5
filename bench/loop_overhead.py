"""Duty cycle of the loop: the share of its wall time spent training.

    python bench/loop_overhead.py [--trials 3] [--profile cpu] [--budget SECONDS]

Runs `loop.py --trials N` (baseline + N trials) in a scratch directory with copies of train.py
and search_space.yaml, on the prepared data of the profile (prepared first if needed), then
prints sum(training_seconds) / wall time of the whole loop process, and the per-trial overhead.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

import pandas as pd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import prepare  # noqa: E402


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
    print(f"wall {wall:.1f}s  training {train:.1f}s  duty cycle {100 * train / wall:.1f}%  "
          f"overhead {(wall - train) / len(df):.1f}s per trial "
          f"(of which start-up+eval inside train.py {(df.total_seconds - df.training_seconds).mean():.1f}s)")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
