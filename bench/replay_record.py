"""Record real runs once, so judges and pruning can be replayed against them.

    python bench/replay_record.py [--budget 20] [--seeds 3] [--baseline-seeds 10]
                                  [--out bench/replay/cpu-20s.jsonl]

Every config of a grid (the full product of a few constants, the profile's defaults among the
levels, so the baseline is one of the configs) is trained by the real runner (runner.run_trial:
the real train.py, the fixed evaluation served from this process) for a fixed budget, with the
same SEEDs for every config: round 1 runs every config with SEED 1, round 2 with SEED 2, and so
on, then the baseline's extra SEEDs. Rounds spread the machine's drift over all configs alike,
and a cut-short recording is still a complete table with fewer SEEDs.

Each run is one JSON line: the config, SEED, val_bpb (None for a crash), steps, seconds, and the
whole curve (progress, smoothed train loss) from train.py's progress lines. Runs already in the
file are skipped, so a stopped recording goes on where it stopped. Record on a quiet machine:
`uptime` first; the load is written into every line.
"""
import argparse
import itertools
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import prepare  # noqa: E402
from autoresearch.patch import patch_constants  # noqa: E402
from autoresearch.protocol import progress_of  # noqa: E402
from autoresearch.runner import run_trial  # noqa: E402

# The constants that moved val_bpb most on the cpu profile in earlier runs (BENCHMARKS.md: the
# learning rate, model size and batch shape), each with the profile's default among its levels.
GRID = {
    "MATRIX_LR": [0.02, 0.04, 0.08],
    "DEPTH": [1, 2, 3],
    "DEVICE_BATCH_SIZE": [8, 16],
    "TOTAL_BATCH_SIZE": [4096, 8192],
}


def grid_configs(grid=GRID):
    names = list(grid)
    return [dict(zip(names, values)) for values in itertools.product(*grid.values())]


def load_table(path):
    """Every recorded run, as dicts (the JSON lines)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def key(config, seed):
    return json.dumps(config, sort_keys=True), seed


def record_one(source, config, seed, budget, data_dir, work, env=None):
    """One run of `config` with this SEED through the real runner, as a table line; `env` adds
    to the trainer's environment (bench/threads.py sets its thread count there)."""
    curve = []

    def on_line(line):
        p = progress_of(line)
        if p is not None:
            curve.append([round(p[1], 4), p[2]])

    text = patch_constants(source, {**config, "SEED": seed})
    trial_dir = tempfile.mkdtemp(dir=work)
    out = run_trial(trial_dir, text, time_limit=budget * 3 + 120, data_dir=data_dir,
                    env={**(env or {}), "AUTORESEARCH_TIME_BUDGET": str(budget)},
                    on_line=on_line)
    s = out.summary if out.ok else {}

    def num(k):
        v = s.get(k)
        return float(v) if v not in (None, "") else None
    return {
        "config": config, "seed": seed, "val_bpb": num("val_bpb"),
        "error": "" if out.ok else out.error, "num_steps": num("num_steps"),
        "training_seconds": num("training_seconds"), "total_seconds": num("total_seconds"),
        "startup_seconds": num("startup_seconds"), "eval_seconds": num("eval_seconds"),
        "wall_seconds": round(out.wall_seconds, 2), "budget": budget, "curve": curve,
        "load": round(os.getloadavg()[0], 2), "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                          time.gmtime()),
    }


def plan(configs, baseline, seeds, baseline_seeds):
    jobs = [(c, s) for s in range(1, seeds + 1) for c in configs]
    jobs += [(baseline, s) for s in range(seeds + 1, baseline_seeds + 1)]
    return jobs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget", type=float, default=20.0)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--baseline-seeds", type=int, default=10)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "replay", "cpu-20s.jsonl"))
    ap.add_argument("--data-dir", default=None, help="a prepared cpu dataset (default: current)")
    args = ap.parse_args(argv)

    data = prepare.load_prepared(args.data_dir)
    defaults = data.profile.train
    baseline = {k: defaults[k] for k in GRID}
    configs = grid_configs()
    assert baseline in configs, "the grid must hold the profile's defaults"
    with open(os.path.join(ROOT, "train.py")) as f:
        source = f.read()
    done = {key(r["config"], r["seed"]) for r in load_table(args.out)}
    jobs = [j for j in plan(configs, baseline, args.seeds, args.baseline_seeds)
            if key(*j) not in done]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    print(f"{len(configs)} configs, {len(done)} runs recorded, {len(jobs)} to go; load "
          f"{os.getloadavg()[0]:.2f}", flush=True)
    with tempfile.TemporaryDirectory() as work:
        for i, (config, seed) in enumerate(jobs, 1):
            row = record_one(source, config, seed, args.budget, data.dir, work)
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"[{i}/{len(jobs)}] {config} seed {seed}: val_bpb {row['val_bpb']} "
                  f"steps {row['num_steps']} wall {row['wall_seconds']}s load {row['load']}"
                  + (f" {row['error']}" if row["error"] else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
