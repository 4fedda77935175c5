"""Two versions of train.py side by side: val_bpb over several seeds, runs interleaved.

    python bench/train_ab.py A B [--seeds 1 2 3 4] [--steps N | --budget SECONDS]
    python bench/train_ab.py A B --step-cost [--repeat 20]

A and B are files or git revisions (`HEAD~1`, `abc123`: that revision's train.py). Runs
A(seed 1), B(seed 1), A(seed 2), ... on the prepared data ($AUTORESEARCH_DATA or the cache's
current dataset), so both see the same machine load, and prints each run, each version's mean
and standard deviation, and the mean paired difference B - A with its standard error.
--steps trains a fixed number of steps (quality per step, unaffected by load; the seconds per
step are printed beside it); --budget a fixed time, as the loop does. --step-cost instead
imports both in one process and times, alternately on the same batch, a forward and backward
pass and the optimizer steps of each (medians), which is steadier on a loaded machine.
"""
import argparse
import importlib.util
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

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


def step_cost(texts, repeat, workdir):
    """Median seconds of forward+backward and of the optimizer steps, per version."""
    sys.path.insert(0, ROOT)
    setups = {}
    for name, text in texts.items():
        path = os.path.join(workdir, f"train_{name}.py")
        with open(path, "w") as f:
            f.write(text)
        spec = importlib.util.spec_from_file_location(f"train_{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        model, dim, _ = module.build_model()
        x, y, _ = next(module.data.make_dataloader("train", module.DEVICE_BATCH_SIZE))
        setups[name] = (model, module.make_optimizers(model, dim), x, y)
    times = {name: ([], []) for name in texts}
    for _ in range(repeat):
        for name, (model, optimizers, x, y) in setups.items():
            t0 = time.perf_counter()
            model(x, y).backward()
            t1 = time.perf_counter()
            for opt in optimizers:
                opt.step()
            times[name][0].append(t1 - t0)
            times[name][1].append(time.perf_counter() - t1)
            model.zero_grad(set_to_none=True)
    for name, (fb, opt) in times.items():
        print(f"{name}: forward+backward {1000 * statistics.median(fb):.1f} ms, optimizer steps "
              f"{1000 * statistics.median(opt):.1f} ms (medians of {repeat}, batch "
              f"{tuple(setups[name][2].shape)})")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4])
    ap.add_argument("--steps", type=int)
    ap.add_argument("--budget", type=float)
    ap.add_argument("--step-cost", action="store_true")
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    texts = {"A": source(args.a), "B": source(args.b)}
    if args.step_cost:
        with tempfile.TemporaryDirectory() as work:
            return step_cost(texts, args.repeat, work)
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
