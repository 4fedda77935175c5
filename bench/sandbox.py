"""What the sandbox and the fixed evaluation's checks cost a trial.

    python bench/sandbox.py [--profile cpu] [--runs 10] [--steps 40] [--rounds 3]

1. Start-up: the same quick trial (the fixture trainer, which does nothing but the protocol)
   run through runner.run_trial with no sandbox, under bubblewrap and in the fallback,
   interleaved --runs times; per-trial wall seconds and the difference.
2. Training throughput: the real train.py for --steps steps on the profile's data, outside and
   inside the sandbox, alternated --rounds times; tokens per second from each summary.
3. The checks: train.py's model evaluated in-process by prepare.FixedEval, each score call
   timed; the check batch against the whole evaluation and against a trial of the profile
   (its TIME_BUDGET plus the start-up and evaluation seconds measured in step 2).
4. The causality check's tolerance: the loss change the probe causes for train.py's model as
   shipped and with non-causal attention, after 1, 5 and 30 steps, fp32 and bf16 autocast.

Data is prepared first if needed (the profile's default source; $AUTORESEARCH_CACHE applies).
"""
import argparse
import os
import runpy
import shutil
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import prepare  # noqa: E402
from autoresearch import sandbox  # noqa: E402
from autoresearch.runner import run_trial  # noqa: E402


def startup(data, runs, boxes, work):
    fake = open(os.path.join(ROOT, "tests", "fixtures", "fake_train.py")).read()
    times = {name: [] for name in boxes}
    for i in range(runs):
        for name, box in boxes.items():
            t0 = time.perf_counter()
            out = run_trial(os.path.join(work, f"s-{name}-{i}"), fake, 60, data, sandbox=box)
            times[name].append(time.perf_counter() - t0)
            assert out.ok, (name, out.error)
    base = statistics.median(times["none"])
    print(f"1. start-up: the fixture trainer through run_trial, median of {runs} (interleaved)")
    for name, t in times.items():
        print(f"   {name:<9} {statistics.median(t):.3f}s  (min {min(t):.3f}s)  "
              f"{statistics.median(t) - base:+.3f}s vs none")


def throughput(data, steps, rounds, boxes, work, profile):
    src = open(os.path.join(ROOT, "train.py")).read()
    env = {"AUTORESEARCH_STEPS": str(steps)}
    rates = {name: [] for name in boxes}
    rest = {name: [] for name in boxes}
    for r in range(rounds):
        for name, box in boxes.items():
            out = run_trial(os.path.join(work, f"t-{name}-{r}"), src, 1800, data, env, sandbox=box)
            assert out.ok, (name, out.error, out.log)
            s = out.summary  # total_tokens_M is rounded to 0.1M: count the tokens instead
            tokens = s["num_steps"] * profile.train["TOTAL_BATCH_SIZE"]
            rates[name].append(tokens / s["training_seconds"])
            rest[name].append(s["total_seconds"] - s["training_seconds"])
    print(f"2. training throughput: train.py, {steps} steps on {profile.name}, median of {rounds} "
          f"(alternated)")
    base = statistics.median(rates["none"])
    for name in boxes:
        m = statistics.median(rates[name])
        print(f"   {name:<9} {m:,.0f} tok/s  ({', '.join(f'{x:,.0f}' for x in rates[name])})  "
              f"ratio {m / base:.3f}; start-up+eval {statistics.median(rest[name]):.1f}s")
    return statistics.median(rest["none"])


def checks(data_dir, overhead, repeats=3):
    os.environ["AUTORESEARCH_DATA"] = data_dir
    g = runpy.run_path(os.path.join(ROOT, "train.py"), run_name="bench")
    model, _, _ = g["build_model"]()
    data, batch = g["data"], g["DEVICE_BATCH_SIZE"]
    fixed = data.fixed_eval()
    score = prepare.model_scorer(model)
    batches = -(-len(fixed.rows) // batch)
    totals, extra = [], []
    for _ in range(repeats):
        calls = []

        def timed(x, y):
            t0 = time.perf_counter()
            out = score(x, y)
            calls.append(time.perf_counter() - t0)
            return out

        t0 = time.perf_counter()
        fixed.run(timed, batch)
        totals.append(time.perf_counter() - t0)
        extra.append(sum(calls[batches:]))
    total, check = statistics.median(totals), statistics.median(extra)
    trial = data.profile.time_budget + overhead
    print(f"3. checks: {len(fixed.rows)} rows in {batches} batches of {batch}, median of {repeats}")
    print(f"   evaluation {total:.2f}s, of which the check batch {check:.3f}s "
          f"({100 * check / total:.1f}% of the evaluation); a {data.profile.name} trial "
          f"({data.profile.time_budget:g}s budget + {overhead:.1f}s start-up and evaluation) "
          f"= {trial:.1f}s: the checks cost {100 * check / trial:.2f}% of it")


def tolerance(data_dir, steps=(1, 5, 30), probes=5):
    """How far the causality probe moves the loss up to p, for train.py's model as shipped and
    with is_causal=False, after a few training steps, in fp32 and under bf16 autocast."""
    import numpy as np
    import torch
    os.environ["AUTORESEARCH_DATA"] = data_dir
    src = open(os.path.join(ROOT, "train.py")).read()
    print(f"4. the causality probe on train.py's model (tolerance {prepare.CHECK_TOLERANCE:g} "
          f"x (1 + loss)): largest loss change up to p over {probes} probes")
    with tempfile.TemporaryDirectory() as d:
        for name, text in (("causal", src), ("non-causal", src.replace("is_causal=True",
                                                                       "is_causal=False"))):
            path = os.path.join(d, f"{name}.py")
            with open(path, "w") as f:
                f.write(text)
            g = runpy.run_path(path, run_name="bench")
            data = g["data"]
            fixed, batch = data.fixed_eval(), g["DEVICE_BATCH_SIZE"]
            rows = fixed.rows[:batch].astype(np.int64)
            x, y = rows[:, :-1], rows[:, 1:]
            T = x.shape[1]
            for n_steps in steps:
                torch.manual_seed(0)
                model, dim, _ = g["build_model"]()
                adamw, muon = g["make_optimizers"](model, dim)
                loader = data.make_dataloader("train", batch, "cpu")
                for _ in range(n_steps):
                    xb, yb, _ = next(loader)
                    model(xb, yb).backward()
                    adamw.step()
                    muon.step()
                    model.zero_grad(set_to_none=True)
                score = prepare.model_scorer(model)
                cells = []
                for dtype in (None, torch.bfloat16):
                    with torch.autocast("cpu", dtype=dtype or torch.float32,
                                        enabled=dtype is not None):
                        base = score(x, y)
                        moved = []
                        for p in np.random.default_rng(0).integers(T // 4, 3 * T // 4 + 1, probes):
                            got = score(fixed.probe(x, int(p), 2), y)
                            moved.append(np.abs(got[:2, :p + 1] - base[:2, :p + 1]).max())
                    cells.append(f"{'bf16' if dtype else 'fp32'} {max(moved):.3g}")
                print(f"   {name:<10} after {n_steps:>2} steps (loss {base.mean():.2f}): "
                      f"{', '.join(cells)}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="cpu", choices=list(prepare.PROFILES))
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", choices=["startup", "throughput", "checks", "tolerance"],
                    help="one part alone")
    args = ap.parse_args()
    profile = prepare.PROFILES[args.profile]
    source = prepare.python_source() if profile.source == "python" else prepare.synthetic_source()
    data = prepare.prepare(profile, source, prepare.cache_dir(), log=lambda *a: None)
    bwrap, why = sandbox.probe()
    boxes = {"none": None}
    if bwrap:
        boxes["bwrap"] = sandbox.Sandbox(bwrap)
    else:
        print(f"(no bubblewrap here: {why})")
    boxes["fallback"] = sandbox.Sandbox(None, "benchmark")
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cpus, bwrap: {bwrap or 'none'}")
    work = tempfile.mkdtemp(prefix="sandbox-bench-")
    try:
        if args.only in (None, "startup"):
            startup(data, args.runs, boxes, work)
        overhead = 5.0  # start-up and evaluation of a quiet cpu trial (BENCHMARKS.md, issue 3)
        if args.only in (None, "throughput"):
            overhead = throughput(data, args.steps, args.rounds, boxes, work, profile)
        if args.only in (None, "checks"):
            checks(data, overhead)
        if args.only in (None, "tolerance"):
            tolerance(data)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
