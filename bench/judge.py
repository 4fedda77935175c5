"""The judges side by side: how often they keep what is not better, and what they reach.

    python bench/judge.py sim  [--loops 200] [--runs 60] [--sigma 0.011] [--gain 0.12]
    python bench/judge.py real [--minutes 25] [--budget 15] [--recheck 3]
    python bench/judge.py null [--runs 30] [--budget 10]

In sim and simnull, --judges also takes new@C, the loop's defaults at confidence C (new@0.8),
and new+first@C, the defaults keeping a first run at once when it is ahead with confidence C.

sim: the real Driver (proposer, novelty checks, patching, judge, ledger) over the real cpu
search space, with the trainer replaced by a noisy objective whose true value is known: a sum
of bowls, one per searched constant (its position on the constant's scale, log where the range
is log), with a random optimum and a random share of the total gain per loop, plus noise made of
a per-SEED part shared by every config (as real seeds are) and a per-run part. Every simulated
loop runs the same number of runs for each judge. It reports, per judge: the share of keeps
whose true value is not better than the incumbent they replaced (false keeps), the true gain
reached, and the share of the recorded gain that is real; and, on a space where nothing
matters, the keeps per loop.

real: the real train.py on the cpu profile, the same wall-clock for each judge, then
`loop.py recheck` with fresh SEEDs: how much of the recorded gain survives.

null: real runs on a space of constants train.py ignores: every keep is a false keep.
"""
import argparse
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import prepare  # noqa: E402
from autoresearch.driver import Driver, Settings  # noqa: E402
from autoresearch.patch import read_constants  # noqa: E402
from autoresearch.runner import Outcome  # noqa: E402
from autoresearch.space import load_space  # noqa: E402

JUDGES = {  # name -> Settings overrides
    "threshold": dict(judge="threshold", baseline_runs=3),
    # the noise judge before the replay of real runs (--confidence and --drop apply to it)
    "noise": dict(judge="noise", baseline_runs=3, incumbent_rule="race", prune="off"),
    # the loop's defaults since (confidence 0.9, drop 0.5, 2 baseline runs, the close rule);
    # the simulated trainer prints no curve, so there is nothing to stop early here
    "new": dict(judge="noise", prune="off"),
}


def judge_settings(name):
    """The Settings overrides of a judge named on the command line: a name in JUDGES, new@C
    (the loop's defaults at confidence C, such as new@0.8) or new+first@C (the defaults keeping
    a first run at once when it is ahead with confidence C)."""
    if name in JUDGES:
        return JUDGES[name]
    at = re.fullmatch(r"new(\+first)?@(0?\.\d+)", name)
    if at and 0.5 < float(at.group(2)) < 1:
        key = "first_confidence" if at.group(1) else "confidence"
        return dict(JUDGES["new"], **{key: float(at.group(2))})
    raise SystemExit(f"unknown judge {name!r}: have {', '.join(JUDGES)}, new@C or new+first@C "
                     f"(a confidence C between 0.5 and 1, such as new@0.8)")


NULL_SPACE = "cpu:\n  mutate: [1, 2]\n  params:\n" + "".join(
    f"    UNUSED_{i}: {{low: 0.1, high: 1.0, log: true}}\n" for i in range(4))


def cpu_data(cache):
    if not os.path.exists(os.path.join(cache, "current")):
        assert prepare.main(["--profile", "cpu", "--cache-dir", cache]) == 0
    with open(os.path.join(cache, "current")) as f:
        return os.path.join(cache, "prepared", f.read().strip())


# --- simulation -----------------------------------------------------------------------------

class Objective:
    """sum_k w_k (u_k - u*_k)^2 over the constants' positions u in [0, 1]; the baseline sits
    where the cpu profile's defaults are, and the available gain is `gain` in all."""

    def __init__(self, space, defaults, gain, rng):
        self.space, self.defaults = space, defaults
        self.opt = {n: rng.uniform(0.1, 0.9) for n in space.params}
        weights = {n: rng.expovariate(1.0) for n in space.params}  # a few matter, most a little
        base = self.position(defaults)
        reach = sum(weights[n] * (base[n] - self.opt[n]) ** 2 for n in space.params)
        self.w = {n: w * gain / reach for n, w in weights.items()} if reach else weights
        self.floor = 1.5  # the best value the space allows

    def position(self, params):
        out = {}
        for n, p in self.space.params.items():
            v = params[n]
            if p.choices is not None:
                opts = sorted(p.choices) if all(isinstance(c, (int, float)) for c in p.choices) \
                    else list(p.choices)
                out[n] = opts.index(v) / max(1, len(opts) - 1)
            elif p.log:
                out[n] = (math.log(v) - math.log(p.low)) / (math.log(p.high) - math.log(p.low))
            else:
                out[n] = (v - p.low) / (p.high - p.low)
        return out

    def __call__(self, params):
        u = self.position(params)
        return self.floor + sum(self.w[n] * (u[n] - self.opt[n]) ** 2 for n in self.space.params)


class SimulatedTrainer:
    """Stands in for runner.run_trial: writes the trial's train.py (retests read it back) and
    returns the objective plus noise, without training anything."""

    def __init__(self, objective, names, defaults, sigma_seed, sigma_run, rng):
        self.objective, self.names, self.defaults = objective, names, defaults
        self.sigma_run, self.rng = sigma_run, rng
        self.seed_luck = {}
        self.sigma_seed = sigma_seed

    def true_value(self, params):
        return self.objective(params) if self.objective is not None else 1.5

    def __call__(self, trial_dir, source, time_limit, data_dir, env, on_line, sandbox=None):
        os.makedirs(trial_dir, exist_ok=True)
        with open(os.path.join(trial_dir, "train.py"), "w") as f:
            f.write(source)
        log = os.path.join(trial_dir, "run.log")
        open(log, "w").close()
        c = read_constants(source)
        params = {n: self.defaults[n] if c[n] is None else c[n] for n in self.names}
        seed = c["SEED"]
        if seed not in self.seed_luck:
            self.seed_luck[seed] = self.rng.normal(0, self.sigma_seed)
        value = self.true_value(params) + self.seed_luck[seed] + self.rng.normal(0, self.sigma_run)
        return Outcome(True, "", {"val_bpb": value, "training_seconds": 60.0, "num_steps": 100},
                       0, 0.0, log)


def simulate(judge, loop, args, data_dir, null=False):
    """One simulated loop; returns its figures."""
    rng = np.random.default_rng([loop, 7])
    work = tempfile.mkdtemp(prefix="judge-sim-", dir=args.tmp)
    try:
        # train.py's constants block alone: what the driver reads and patches (the objective
        # stands in for the rest), and quick to parse thousands of times
        full = open(os.path.join(ROOT, "train.py")).read()
        train = full[:full.index("\nSEED = 42\n") + len("\nSEED = 42\n")]
        if null:
            train = train.replace("\nSEED = 42", "\nSEED = 42\n" + "".join(
                f"UNUSED_{i} = 0.3\n" for i in range(4)), 1)
            space_text = NULL_SPACE
        else:
            space_text = open(os.path.join(ROOT, "search_space.yaml")).read()
        open(os.path.join(work, "train.py"), "w").write(train)
        open(os.path.join(work, "search_space.yaml"), "w").write(space_text)
        defaults = dict(prepare.PROFILES["cpu"].train)
        consts = {**read_constants(train)}
        effective = {n: defaults.get(n, v) if v is None else v for n, v in consts.items()}
        p = prepare.PROFILES["cpu"]
        space = load_space(os.path.join(work, "search_space.yaml"), "cpu", effective | dict(
            MAX_SEQ_LEN=p.max_seq_len, TIME_BUDGET=p.time_budget, EVAL_TOKENS=p.eval_tokens,
            VOCAB_SIZE=p.vocab_size))
        names = list(space.params)
        objective = None if null else Objective(space, effective, args.gain,
                                                random.Random(loop))
        trainer = SimulatedTrainer(objective, names, effective, args.sigma_seed, args.sigma_run,
                                   rng)
        settings = Settings(train_path=os.path.join(work, "train.py"),
                            space_path=os.path.join(work, "search_space.yaml"),
                            results_path=os.path.join(work, "results.tsv"), data_dir=data_dir,
                            seed=loop, run_fn=trainer, worker="sim", strategy=args.strategy,
                            sandbox="off", storage=":memory:",  # simulated: no record to keep
                            **judge_settings(judge),
                            **(dict(max_runs=args.max_runs, confidence=args.confidence)
                               if judge == "noise" else {}))
        driver = Driver(settings, log=lambda *a: None)
        if judge == "noise":
            driver.judge.drop, driver.judge.incumbent_runs = args.drop, args.incumbent_runs
        for _ in range(args.runs):
            driver.step()
        runs, configs = driver.runs, driver.configs
        keeps, false_keeps, current = 0, 0, None
        for r in sorted(runs, key=lambda r: r.trial):
            if r.status != "keep" or r.config == current:
                continue
            if current is not None:
                keeps += 1
                old, new = configs[current].params, configs[r.config].params
                false_keeps += trainer.true_value(new) >= trainer.true_value(old)
            current = r.config
        base = driver.baseline()
        inc = driver.incumbent
        return {"keeps": keeps, "false_keeps": false_keeps,
                "true_gain": trainer.true_value(base.params) - trainer.true_value(inc.params),
                "recorded_gain": base.mean - inc.mean,
                "available": 0.0 if null else objective(effective) - objective.floor}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def sim_main(args, null=False):
    for judge in args.judges:  # a misspelt judge fails now, not after the first judge's loops
        judge_settings(judge)
    data_dir = cpu_data(args.cache)
    print(f"{'null space' if null else 'cpu space'}: {args.strategy}, {args.loops} loops x "
          f"{args.runs} runs per judge, sigma {math.hypot(args.sigma_seed, args.sigma_run):.4f} (seed part "
          f"{args.sigma_seed:.4f}, run part {args.sigma_run:.4f}), available gain "
          f"{0 if null else args.gain}", flush=True)
    table = {}
    for judge in args.judges:
        t0 = time.time()
        out = [simulate(judge, loop, args, data_dir, null) for loop in range(args.loops)]
        keeps = sum(o["keeps"] for o in out)
        false = sum(o["false_keeps"] for o in out)
        true = np.array([o["true_gain"] for o in out])
        recorded = np.array([o["recorded_gain"] for o in out])
        table[judge] = row = {
            "keeps_per_loop": keeps / len(out), "false_keep_rate": false / keeps if keeps else 0.0,
            "false_keeps_per_loop": false / len(out),
            "true_gain": float(true.mean()), "true_gain_se": float(true.std(ddof=1) / math.sqrt(len(out))),
            "recorded_gain": float(recorded.mean()),
            "real_share": float(true.sum() / recorded.sum()) if recorded.sum() > 0 else None,
            "seconds": time.time() - t0}
        share = "-" if row["real_share"] is None else f"{100 * row['real_share']:.0f}%"
        print(f"{judge:>9}: keeps/loop {row['keeps_per_loop']:.2f}, false keeps "
              f"{100 * row['false_keep_rate']:.1f}% ({row['false_keeps_per_loop']:.2f}/loop), true "
              f"gain {row['true_gain']:.4f} +- {row['true_gain_se']:.4f}, recorded "
              f"{row['recorded_gain']:.4f}, real share {share} ({row['seconds']:.0f}s)", flush=True)
    print(json.dumps({"args": vars(args), "null": null, "table": table}))


# --- real runs ------------------------------------------------------------------------------

def loop_cli(args, cwd, env=None, timeout=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, "loop.py"), *args], cwd=cwd,
                          env=dict(os.environ, **(env or {})), capture_output=True, text=True,
                          timeout=timeout)


def real_main(args):
    data_dir = cpu_data(args.cache)
    env = {"AUTORESEARCH_DATA": data_dir}
    for judge in args.judges:
        work = tempfile.mkdtemp(prefix=f"judge-real-{judge}-", dir=args.tmp)
        shutil.copy(os.path.join(ROOT, "train.py"), work)
        shutil.copy(os.path.join(ROOT, "search_space.yaml"), work)
        t0 = time.time()
        proc = loop_cli(["--judge", judge, "--budget", str(args.budget), "--hours",
                         str(args.minutes / 60)], work, env)
        loop_seconds = time.time() - t0
        if proc.returncode:
            print(proc.stderr[-3000:])
            raise SystemExit(f"{judge}: loop.py failed")
        report = loop_cli(["report"], work, env).stdout
        check = loop_cli(["recheck", "--runs", str(args.recheck)], work, env)
        print(f"== {judge}: {args.minutes} min at {args.budget:g}s per run ({loop_seconds:.0f}s "
              f"wall), results in {work}\n{report}\n{check.stdout.strip() or check.stderr.strip()}\n",
              flush=True)


def null_main(args):
    data_dir = cpu_data(args.cache)
    env = {"AUTORESEARCH_DATA": data_dir}
    train = open(os.path.join(ROOT, "train.py")).read().replace(
        "\nSEED = 42", "\nSEED = 42\n" + "".join(f"UNUSED_{i} = 0.3\n" for i in range(4)), 1)
    for judge in args.judges:
        work = tempfile.mkdtemp(prefix=f"judge-null-{judge}-", dir=args.tmp)
        open(os.path.join(work, "train.py"), "w").write(train)
        open(os.path.join(work, "search_space.yaml"), "w").write(NULL_SPACE)
        proc = loop_cli(["--judge", judge, "--budget", str(args.budget), "--trials",
                         str(args.runs)], work, env)
        if proc.returncode:
            print(proc.stderr[-3000:])
            raise SystemExit(f"{judge}: loop.py failed")
        import pandas as pd
        df = pd.read_csv(os.path.join(work, "results.tsv"), sep="\t")
        keeps = df[df.status == "keep"]
        new = keeps[keeps.config != keeps.config.shift()]
        base = df[df.strategy == "baseline"].val_bpb
        print(f"{judge:>9}: {len(df)} runs, {len(new) - 1} keep(s) of a constant train.py "
              f"ignores; baseline {base.mean():.4f} +- {base.std():.4f} over {len(base)} runs; "
              f"results in {work}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=["sim", "real", "null", "simnull"])
    ap.add_argument("--judges", nargs="+", default=list(JUDGES))
    ap.add_argument("--strategy", default="greedy", choices=["greedy", "random", "tpe", "cmaes"])
    ap.add_argument("--loops", type=int, default=200)
    ap.add_argument("--runs", type=int, default=60)
    ap.add_argument("--sigma-seed", type=float, default=0.0092,
                    help="noise part shared by every config run with the same SEED")
    ap.add_argument("--sigma-run", type=float, default=0.006, help="per-run noise")
    ap.add_argument("--gain", type=float, default=0.12, help="true gain the space allows")
    ap.add_argument("--max-runs", type=int, default=3)
    ap.add_argument("--confidence", type=float, default=0.95)
    ap.add_argument("--drop", type=float, default=0.0)
    ap.add_argument("--incumbent-runs", type=int, default=6)
    ap.add_argument("--minutes", type=float, default=25)
    ap.add_argument("--budget", type=float, default=15)
    ap.add_argument("--recheck", type=int, default=3)
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "bench-judge-cache"))
    ap.add_argument("--tmp", default="/dev/shm" if os.path.isdir("/dev/shm") else None)
    args = ap.parse_args()
    if args.mode == "sim":
        sim_main(args)
    elif args.mode == "simnull":
        sim_main(args, null=True)
    elif args.mode == "real":
        real_main(args)
    else:
        null_main(args)


if __name__ == "__main__":
    main()
