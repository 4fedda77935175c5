"""The judges, the stopping rule and the strategies on a replay of real runs.

    python bench/replay.py analyze [--table bench/replay/cpu-20s.jsonl]
    python bench/replay.py run [--loops 200] [--compute 30] [--strategies greedy random tpe cmaes]
                               [--variants threshold noise new ...] [--set name=value ...]
                               [--jobs 2] [--json out.json]

The table (bench/replay_record.py) holds real runs of a grid of configs, each with the same
SEEDs, and each run's whole curve. A replay runs the real driver (proposer, novelty checks,
patching, judge, stopping rule, results.tsv) with the trainer swapped for the table: asking for
a (config, SEED) returns the recorded run, its progress lines fed to the driver as train.py
would print them (so the stopping rule sees the real curve and stops it where it would), and
time is the recorded seconds. The space of a replay is the grid. Each loop maps the driver's
SEEDs to the recorded ones through its own random order (the same order for every config, so
luck that comes with a SEED stays shared); a run past the recorded SEEDs of its config (the
incumbent's re-runs) is drawn from the config's mean plus a residual of the table, with the
curve of one of its recorded runs, and counted.

Every loop gets the same compute: the wall seconds of `--compute` full baseline runs. The
figures, per strategy and variant, over the loops:
- false keeps: keeps whose table mean is not below the table mean of the incumbent they replaced;
- true gain: the table mean of the baseline minus that of the final incumbent;
- real share: the true gain summed over loops divided by the recorded gain (the driver's own
  baseline mean minus incumbent mean);
- pruning: share of the compute's seconds the stopped runs saved, and the false-prune rate
  (stopped configs whose table mean is below the table mean of the incumbent they were
  compared with).

analyze prints the table's noise per config, the part of it that comes with the SEED, and the
rank correlation between the loss at each progress and the final val_bpb across configs, and
calibrates the stopping rule on every pair of configs.
"""
import argparse
import json
import math
import multiprocessing
import os
import random
import shutil
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import prepare  # noqa: E402
from autoresearch import curves  # noqa: E402
from autoresearch.driver import Driver, LoopError, Settings  # noqa: E402
from autoresearch.judge import EarlyStop  # noqa: E402
from autoresearch.patch import read_constants  # noqa: E402
from autoresearch.runner import Outcome  # noqa: E402

TABLE = os.path.join(ROOT, "bench", "replay", "cpu-20s.jsonl")

# name -> Settings overrides. "new" is the noise judge with every part that the replay showed
# to pay (Settings' defaults); each part alone is its own variant, so its worth is measured.
TODAY = dict(judge="noise", confidence=0.95, drop=0.0, baseline_runs=3, incumbent_rule="race",
             prune="off")                      # the noise judge before the replay
CONFIRM = dict(judge="noise", confidence=0.9, drop=0.5, baseline_runs=2, incumbent_rule="close")
PRUNE = dict(prune="on", prune_start=0.1, prune_sigmas=Settings.prune_sigmas)  # 2.5 before 1.5
VARIANTS = {
    "threshold": dict(judge="threshold", baseline_runs=1, prune="off"),  # Karpathy's rule
    "threshold+prune": dict(judge="threshold", baseline_runs=2, **PRUNE),  # (noise at p: 2 runs)
    "noise": TODAY,
    "confirm": dict(CONFIRM, prune="off"),
    "prune": dict(TODAY, **PRUNE),
    "pair": dict(CONFIRM, paired=True, **PRUNE),
    "new": dict(CONFIRM, **PRUNE),             # the loop's defaults
    "new+rerun-stops": dict(CONFIRM, prune_reruns=True, **PRUNE),  # before: re-runs stopped too
    "new+median": dict(CONFIRM, prune="median", prune_start=0.1),      # Optuna's pruners instead
    "new+wilcoxon": dict(CONFIRM, prune="wilcoxon", prune_start=0.1),
}


def key_of(config):
    return json.dumps(config, sort_keys=True)


class Table:
    """The recorded runs: config -> SEED -> run, and each config's mean (its 'true' value)."""

    def __init__(self, path):
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        if not rows:
            raise SystemExit(f"{path} holds no runs: record some with bench/replay_record.py")
        self.names = sorted(rows[0]["config"])
        self.runs = {}
        for r in rows:
            if r["val_bpb"] is not None and r["curve"]:
                self.runs.setdefault(key_of(r["config"]), {})[r["seed"]] = r
        self.configs = {k: next(iter(v.values()))["config"] for k, v in self.runs.items()}
        self.mean = {k: float(np.mean([r["val_bpb"] for r in v.values()]))
                     for k, v in self.runs.items()}
        self.levels = {n: sorted({c[n] for c in self.configs.values()}) for n in self.names}
        residuals = []
        for v in self.runs.values():
            values = [r["val_bpb"] for r in v.values()]
            if len(values) > 1:
                m, scale = np.mean(values), math.sqrt(len(values) / (len(values) - 1))
                residuals += [(x - m) * scale for x in values]
        self.residuals = np.array(residuals)
        self.common_seeds = sorted(set.intersection(*(set(v) for v in self.runs.values())))
        self.rows = rows

    def space_yaml(self, profile):
        params = "".join(f"    {n}: {{choices: {json.dumps(self.levels[n])}}}\n"
                         for n in self.names)
        return f"{profile}:\n  mutate: [1, 2]\n  params:\n{params}"


class ReplayTrainer:
    """Stands in for runner.run_trial: the recorded run of the (config, SEED) asked for."""

    def __init__(self, table, defaults, rng):
        self.table, self.defaults, self.rng = table, defaults, rng
        seeds = list(table.common_seeds)
        rng.shuffle(seeds)
        self.order = seeds   # the driver's k-th SEED of any config is the recorded order[k]
        self.spent = 0.0     # wall seconds charged so far
        self.saved = 0.0     # seconds stopped runs did not spend
        self.runs = self.synthetic = 0
        self.outside = 0     # configs asked for that the grid does not hold

    def record_for(self, key, index):
        runs = self.table.runs[key]
        if index < len(self.order):
            return runs[self.order[index]], False
        extra = sorted(s for s in runs if s not in self.order)
        if index - len(self.order) < len(extra):  # the baseline's further recorded SEEDs
            return runs[extra[index - len(self.order)]], False
        like = runs[self.rng.choice(sorted(runs))]
        value = self.table.mean[key] + float(self.rng.choice(self.table.residuals))
        return dict(like, val_bpb=value), True

    def __call__(self, trial_dir, source, time_limit, data_dir, env, on_line, sandbox=None):
        os.makedirs(trial_dir, exist_ok=True)
        with open(os.path.join(trial_dir, "train.py"), "w") as f:
            f.write(source)
        log_path = os.path.join(trial_dir, "run.log")
        c = read_constants(source)
        config = {n: self.defaults[n] if c.get(n) is None else c[n] for n in self.table.names}
        key = key_of(config)
        if key not in self.table.runs:
            self.outside += 1
            open(log_path, "w").close()
            return Outcome(False, "error: not in the replay table", {}, 1, 0.0, log_path)
        run, synthetic = self.record_for(key, c["SEED"] - 1)
        self.runs += 1
        self.synthetic += synthetic
        train, wall = run["training_seconds"], run["wall_seconds"]
        with open(log_path, "w") as log:
            for i, (p, loss) in enumerate(run["curve"], 1):
                line = (f"step {i:05d} | progress {p:.3f} | loss {loss:.4f} | lrm 1.00 | dt 0ms | "
                        f"tok/s 1,000 | mfu 0.0% | epoch 0")
                log.write(line + "\n")
                reason = on_line(line) if on_line is not None else None
                if reason:
                    used = wall - train * (1 - p) - run["eval_seconds"]
                    self.spent += used
                    self.saved += wall - used
                    return Outcome(False, reason, {}, -15, used, log_path, pruned=True)
            summary = {"val_bpb": run["val_bpb"], "training_seconds": train,
                       "total_seconds": run["total_seconds"], "num_steps": run["num_steps"],
                       "peak_vram_mb": 0.0, "mfu_percent": 0.0, "total_tokens_M": 0.0,
                       "num_params_M": 0.0}
            log.write("---\n" + "".join(f"{k}: {v}\n" for k, v in summary.items()))
        self.spent += wall
        return Outcome(True, "", summary, 0, wall, log_path)


def replay_loop(table, variant, strategy, loop, compute, data_dir, overrides=None):
    """One replayed loop; returns its figures."""
    rng = random.Random(f"{loop}:{strategy}")  # the same SEED order for every variant
    work = tempfile.mkdtemp(prefix="replay-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    try:
        full = open(os.path.join(ROOT, "train.py")).read()
        head = full[:full.index("\nSEED = 42\n")] + "\nSEED = 1\n"  # the constants block
        with open(os.path.join(work, "train.py"), "w") as f:
            f.write(head)
        profile = prepare.load_prepared(data_dir).profile
        with open(os.path.join(work, "search_space.yaml"), "w") as f:
            f.write(table.space_yaml(profile.name))
        defaults = dict(profile.train)
        trainer = ReplayTrainer(table, defaults, rng)
        overrides = overrides or {}
        options = dict(VARIANTS[variant], **{k: v for k, v in overrides.items() if "." not in k})
        # the study in memory: a replay's figures use the recorded seconds, not the record's
        settings = Settings(train_path=os.path.join(work, "train.py"),
                            space_path=os.path.join(work, "search_space.yaml"),
                            results_path=os.path.join(work, "results.tsv"), data_dir=data_dir,
                            seed=loop, run_fn=trainer, worker="replay", strategy=strategy,
                            sandbox="off", storage=":memory:", **options)
        driver = Driver(settings, log=lambda *a: None)
        for name, value in overrides.items():  # judge.drop=0.5 and the like
            if name.startswith("judge.") and hasattr(driver.judge, name[6:]):
                setattr(driver.judge, name[6:], value)
        budget = compute * np.mean([r["wall_seconds"] for r in
                                    table.runs[key_of({n: defaults[n] for n in table.names})].values()])
        exhausted = False
        while trainer.spent < budget and not exhausted:
            try:
                driver.step()
            except LoopError:  # the grid around the incumbent is used up
                exhausted = True
        return figures(driver, table, trainer) | {"exhausted": exhausted}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def figures(driver, table, trainer):
    runs, configs = driver.runs, driver.configs

    def true(config_id):
        return table.mean[key_of({n: configs[config_id].params[n] for n in table.names})]
    keeps = false_keeps = pruned = false_prunes = 0
    current = None
    for r in sorted(runs, key=lambda r: r.trial):
        if r.status == "pruned" and current is not None:
            pruned += 1
            false_prunes += true(r.config) < true(current)
        if r.status != "keep" or r.config == current:
            continue
        if current is not None:
            keeps += 1
            false_keeps += true(r.config) >= true(current)
        current = r.config
    base, inc = driver.baseline(), driver.incumbent
    return {"keeps": keeps, "false_keeps": false_keeps, "true_gain": true(base.id) - true(inc.id),
            "recorded_gain": base.mean - inc.mean, "runs": trainer.runs,
            "synthetic": trainer.synthetic, "pruned": pruned, "false_prunes": false_prunes,
            "spent": trainer.spent, "saved": trainer.saved, "configs": len(configs) - 1,
            "outside": trainer.outside}


def summarize(out):
    keeps = sum(o["keeps"] for o in out)
    true = np.array([o["true_gain"] for o in out])
    recorded = np.array([o["recorded_gain"] for o in out])
    pruned = sum(o["pruned"] for o in out)
    return {
        "loops": len(out), "keeps_per_loop": keeps / len(out),
        "false_keep_rate": sum(o["false_keeps"] for o in out) / keeps if keeps else 0.0,
        "true_gain": float(true.mean()), "true_gain_se": float(true.std(ddof=1) / math.sqrt(len(out)))
        if len(out) > 1 else 0.0,
        "recorded_gain": float(recorded.mean()),
        "real_share": float(true.sum() / recorded.sum()) if recorded.sum() > 0 else None,
        "runs_per_loop": sum(o["runs"] for o in out) / len(out),
        "configs_per_loop": sum(o["configs"] for o in out) / len(out),
        "synthetic_share": sum(o["synthetic"] for o in out) / max(1, sum(o["runs"] for o in out)),
        "pruned_per_loop": pruned / len(out),
        "false_prune_rate": sum(o["false_prunes"] for o in out) / pruned if pruned else 0.0,
        "saved_share": sum(o["saved"] for o in out) / sum(o["spent"] + o["saved"] for o in out),
        "exhausted": sum(o["exhausted"] for o in out) / len(out),
    }


def _loop_job(job):
    table_path, variant, strategy, loop, compute, data_dir, overrides = job
    return replay_loop(_table(table_path), variant, strategy, loop, compute, data_dir, overrides)


_TABLES = {}


def _table(path):
    if path not in _TABLES:
        _TABLES[path] = Table(path)
    return _TABLES[path]


def cpu_data():
    """A prepared cpu dataset (the driver reads its profile; the replay trains nothing): the
    judge bench's, shared with it."""
    from judge import cpu_data as prepared_cpu  # bench/judge.py, beside this file
    return prepared_cpu(os.path.join(tempfile.gettempdir(), "bench-judge-cache"))


def run_main(args):
    data_dir = cpu_data()
    overrides = {}
    for item in args.set or []:
        name, _, value = item.partition("=")
        try:   # a number, true/false/null, a list; else the text itself (prior=night)
            overrides[name] = json.loads(value)
        except ValueError:
            overrides[name] = value
    table = _table(args.table)
    print(f"replay of {args.table}: {len(table.runs)} configs, {len(table.rows)} runs, "
          f"{args.loops} loops per cell, compute {args.compute} baseline runs"
          + (f", overrides {overrides}" if overrides else ""), flush=True)
    results = {}
    with multiprocessing.Pool(args.jobs) as pool:
        for strategy in args.strategies:
            for variant in args.variants:
                t0 = time.time()
                jobs = [(args.table, variant, strategy, loop, args.compute, data_dir, overrides)
                        for loop in range(args.loops)]
                out = pool.map(_loop_job, jobs, chunksize=4)
                row = results[f"{strategy}/{variant}"] = summarize(out)
                share = "-" if row["real_share"] is None else f"{100 * row['real_share']:.0f}%"
                print(f"{strategy:>7} {variant:>16}: true gain {row['true_gain']:.4f} +- "
                      f"{row['true_gain_se']:.4f}, false keeps {100 * row['false_keep_rate']:.1f}% "
                      f"({row['keeps_per_loop']:.2f} keeps/loop), real share {share}, "
                      f"{row['runs_per_loop']:.1f} runs / {row['configs_per_loop']:.1f} configs "
                      f"per loop, pruned {row['pruned_per_loop']:.1f}/loop saving "
                      f"{100 * row['saved_share']:.0f}% (false prunes "
                      f"{100 * row['false_prune_rate']:.1f}%), synthetic runs "
                      f"{100 * row['synthetic_share']:.0f}%, grid used up in {100 * row['exhausted']:.0f}% "
                      f"({time.time() - t0:.0f}s)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)


# --- analysis of the table --------------------------------------------------------------------

def analyze_main(args):
    from scipy import stats
    table = _table(args.table)
    seeds = table.common_seeds
    keys = sorted(table.runs, key=lambda k: table.mean[k])
    print(f"{args.table}: {len(keys)} configs, {len(table.rows)} runs, SEEDs common to all: "
          f"{seeds}; budget {table.rows[0]['budget']:g}s; load while recording "
          f"{min(r['load'] for r in table.rows):.2f}-{max(r['load'] for r in table.rows):.2f}")
    crashes = [r for r in table.rows if r["val_bpb"] is None]
    if crashes:
        print(f"crashed runs: {len(crashes)}")

    # Noise per config, and how much of it comes with the SEED (two-way layout, configs x
    # the SEEDs every config ran: seed effects are the column means of the residuals).
    stds = {k: float(np.std([r["val_bpb"] for r in table.runs[k].values()], ddof=1))
            for k in keys if len(table.runs[k]) > 1}
    pooled = math.sqrt(np.mean([s ** 2 for s in stds.values()]))
    print(f"\nnoise per config: pooled std {pooled:.4f}; per config min {min(stds.values()):.4f}, "
          f"median {np.median(list(stds.values())):.4f}, max {max(stds.values()):.4f}")
    base_key = key_of({n: prepare.PROFILES['cpu'].train[n] for n in table.names})
    base_values = [r["val_bpb"] for r in table.runs[base_key].values()]
    print(f"baseline: mean {np.mean(base_values):.4f}, std {np.std(base_values, ddof=1):.4f} over "
          f"{len(base_values)} runs")
    grid = np.array([[table.runs[k][s]["val_bpb"] for s in seeds] for k in keys])
    resid = grid - grid.mean(axis=1, keepdims=True)
    seed_effect = resid.mean(axis=0)
    within = resid - seed_effect
    n_c, n_s = grid.shape
    ms_seed = n_c * float((seed_effect ** 2).sum()) / (n_s - 1)
    ms_error = float((within ** 2).sum()) / ((n_c - 1) * (n_s - 1))
    var_seed = max(0.0, (ms_seed - ms_error) / n_c)
    f_stat = ms_seed / ms_error
    p_value = 1 - stats.f.cdf(f_stat, n_s - 1, (n_c - 1) * (n_s - 1))
    total = var_seed + ms_error
    print(f"SEED part: seed effects {', '.join(f'{e:+.4f}' for e in seed_effect)}; variance "
          f"shared across configs {var_seed:.2e} of {total:.2e} ({100 * var_seed / total:.0f}%); "
          f"F = {f_stat:.2f}, p = {p_value:.3f}")
    # paired differences against the baseline, next to unpaired ones
    diffs = grid - grid[keys.index(base_key)]
    print(f"std of a difference between two configs' runs: paired (same SEED) "
          f"{np.sqrt(np.mean(np.var(diffs[[i for i in range(n_c) if keys[i] != base_key]], axis=1, ddof=1))):.4f}"
          f", unpaired {pooled * math.sqrt(2):.4f}")

    # Loss at progress p against the final val_bpb, across configs (their means).
    print("\nrank correlation (Spearman) across configs between the mean smoothed loss at "
          "progress p and the mean final val_bpb:")
    finals = [table.mean[k] for k in keys]
    at = {p: [float(np.mean([curves.loss_at(r["curve"], p) for r in table.runs[k].values()]))
              for k in keys] for p in curves.CHECKPOINTS}
    for p in curves.CHECKPOINTS:
        rho = stats.spearmanr(at[p], finals).statistic
        print(f"  p {p:.1f}: rho {rho:.3f}")
    calibrate(table, keys)


def calibrate(table, keys):
    """The stopping rule on every ordered pair (challenger, incumbent) of configs and every
    challenger run: how often it stops a challenger whose mean is better (false prunes) and
    what it saves, for each start and margin."""
    groups = [[{p: curves.loss_at(r["curve"], p) for p in curves.CHECKPOINTS}
               for r in table.runs[k].values()] for k in keys]
    noise_at = curves.noise_at(groups)
    print("\nnoise of the smoothed loss between SEEDs at each checkpoint: "
          + ", ".join(f"{p:.1f}: {s:.4f}" for p, s in noise_at.items()))
    print("\nstopping rule on every pair of configs (incumbent: its first 3 runs' curves):")
    print("| start | sigmas | runs of better configs stopped | runs of worse configs stopped | "
          "training saved |")
    print("|---|---|---|---|---|")
    for start in (0.1, 0.2, 0.3, 0.4, 0.5):
        for sigmas in (2.0, 3.0, 4.0, 6.0):
            rule = EarlyStop(start, sigmas)
            better = worse = better_stopped = worse_stopped = 0
            saved = total = 0.0
            for i, inc in enumerate(keys):
                reference = rule.reference(groups[i][:3], noise_at)
                for j, ch in enumerate(keys):
                    if i == j:
                        continue
                    is_better = table.mean[ch] < table.mean[inc]
                    for run, cps in zip(table.runs[ch].values(), groups[j]):
                        stop = next((p for p in reference
                                     if rule.check(p, cps.get(p), reference)), None)
                        total += run["training_seconds"]
                        if is_better:
                            better += 1
                            better_stopped += stop is not None
                        else:
                            worse += 1
                            worse_stopped += stop is not None
                        if stop is not None:
                            saved += run["training_seconds"] * (1 - stop)
            print(f"| {start:.1f} | {sigmas:g} | {100 * better_stopped / better:.1f}% | "
                  f"{100 * worse_stopped / worse:.1f}% | {100 * saved / total:.0f}% |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=["analyze", "run"])
    ap.add_argument("--table", default=TABLE)
    ap.add_argument("--loops", type=int, default=200)
    ap.add_argument("--compute", type=float, default=30, help="full baseline runs of compute")
    ap.add_argument("--strategies", nargs="+", default=["greedy", "random", "tpe", "cmaes"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--set", nargs="*", help="Settings overrides for every variant, name=value")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    if args.mode == "analyze":
        analyze_main(args)
    else:
        run_main(args)


if __name__ == "__main__":
    main()
