"""What a trial spends outside training, phase by phase, in fresh processes like the loop's.

    python bench/overhead.py [--profile cpu] [--repeat 3] [--against REV] [--compile]

Each repeat starts a new Python process per variant that does what train.py does before and
after its timed loop, timing each phase: importing torch, loading the prepared data, train.py's
module-level setup, building the model and its optimizers, the first batch, the first three
training steps beyond three median steady ones (with --compile: the compilation), and the fixed
evaluation. Variants run alternately, so they share the machine's load; two tables hold the
median of each phase by wall clock and by the process's CPU time (user + system, all threads:
less sensitive to other load on a shared machine). The bare interpreter (`python -c pass`) is
timed beside them.

Variants: the working tree's train.py; with --against REV also REV's train.py (a git
revision), for before/after figures. With --compile, each train.py runs compiled twice: with
an empty compile cache (what every trial paid before the cache was kept) and with the lasting
cache of $AUTORESEARCH_CACHE/compile (warmed by the first repeat).
"""
import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHASES = ("import torch", "load prepared data", "train.py setup", "build model", "first batch")


def child(args):
    """One fresh process: the phases of a trial outside its timed loop, as JSON on stdout."""
    t = [("start", time.time(), time.process_time())]

    def mark(name):
        t.append((name, time.time(), time.process_time()))

    import torch
    mark("import torch")
    sys.path.insert(0, ROOT)
    import prepare
    data = prepare.load_prepared()
    mark("load prepared data")
    spec = importlib.util.spec_from_file_location("train_module", args.train)
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)  # the module-level setup; training runs only as __main__
    mark("train.py setup")
    train.check_config()
    model, dim, _ = train.build_model()
    adamw, muon = train.make_optimizers(model, dim)
    step_model = torch.compile(model, dynamic=False) if train.COMPILE else model
    mark("build model")
    accum = train.TOTAL_BATCH_SIZE // (train.DEVICE_BATCH_SIZE * train.MAX_SEQ_LEN)
    loader = data.make_dataloader("train", train.DEVICE_BATCH_SIZE, train.device)
    x, y, _ = next(loader)
    mark("first batch")

    def step():
        nonlocal x, y
        for _ in range(accum):
            with train.autocast:
                loss = step_model(x, y)
            (loss / accum).backward()
            x, y, _ = next(loader)
        adamw.step()
        muon.step()
        model.zero_grad(set_to_none=True)
        loss.item()
        train.sync()

    for _ in range(3):  # a compiled model may specialise again after its first step
        step()
    mark("first 3 steps")
    steady = []
    for _ in range(args.steps):
        t0, c0 = time.time(), time.process_time()
        step()
        steady.append((time.time() - t0, time.process_time() - c0))
    mark("steady steps")
    with train.autocast:
        data.evaluate_bpb(model, train.DEVICE_BATCH_SIZE)
    mark("evaluate")
    phases = {b[0]: b[1] - a[1] for a, b in zip(t, t[1:])}
    cpu = {b[0]: b[2] - a[2] for a, b in zip(t, t[1:])}
    phases["steady step"] = statistics.median(w for w, _ in steady)
    cpu["steady step"] = statistics.median(c for _, c in steady)
    print(json.dumps(dict(wall=phases, cpu=cpu, dynamo="torch._dynamo" in sys.modules)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--against", metavar="REV", help="also time this git revision's train.py")
    ap.add_argument("--compile", action="store_true", help="AUTORESEARCH_COMPILE=1, cold and warm")
    ap.add_argument("--steps", type=int, default=8, help="steady steps timed (median taken)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--train", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    sys.path.insert(0, ROOT)
    import prepare
    profile = prepare.PROFILES[args.profile]
    source = prepare.python_source() if profile.source == "python" else prepare.synthetic_source()
    data_dir = os.environ.get("AUTORESEARCH_DATA") or prepare.prepare(
        profile, source, prepare.cache_dir(), log=lambda *a: None)
    scratch = tempfile.mkdtemp(prefix="overhead-")
    trains = {"now": os.path.join(ROOT, "train.py")}
    if args.against:
        trains[args.against] = os.path.join(scratch, "train_before.py")
        with open(trains[args.against], "w") as f:
            f.write(subprocess.run(["git", "show", f"{args.against}:train.py"], cwd=ROOT,
                                   check=True, capture_output=True, text=True).stdout)
    variants = {}
    for name, path in trains.items():
        if args.compile:
            variants[f"{name}, cold cache"] = (path, True)
            variants[f"{name}, kept cache"] = (path, False)
        else:
            variants[name] = (path, False)
    env = dict(os.environ, AUTORESEARCH_DATA=data_dir, PYTHONPATH=ROOT,
               AUTORESEARCH_COMPILE="1" if args.compile else "0")
    results = {v: [] for v in variants}
    bare = []
    for _ in range(args.repeat):
        t0 = time.time()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        bare.append(time.time() - t0)
        for v, (path, cold) in variants.items():
            run_env = dict(env)
            if cold:
                cache = tempfile.mkdtemp(prefix="cold-", dir=scratch)
                run_env["TORCHINDUCTOR_CACHE_DIR"] = run_env["TRITON_CACHE_DIR"] = cache
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child",
                                  "--train", path, "--steps", str(args.steps)], env=run_env, capture_output=True,
                                 text=True, check=True).stdout
            results[v].append(json.loads(out.strip().splitlines()[-1]))
    shutil.rmtree(scratch)

    print(f"profile {args.profile}, compile {'on' if args.compile else 'off'}, median of "
          f"{args.repeat} fresh processes per variant, run alternately; load average now "
          f"{os.getloadavg()[0]:.1f}; bare interpreter start+exit "
          f"{statistics.median(bare):.2f} s")
    for clock in ("wall", "cpu"):
        table(results, clock)
    each = {v: " ".join(f"{r['wall']['first 3 steps']:.1f}" for r in rs) for v, rs in results.items()}
    print(f"{'first 3 steps, each repeat':30s}" + "".join(f"{e:>{width(results)}s}"
                                                          for e in each.values()))
    print(f"{'imports torch._dynamo':30s}" + "".join(
        f"{str(rs[0]['dynamo']):>{width(results)}s}" for rs in results.values()))


def width(results):
    return max(16, *(len(v) + 2 for v in results))


def table(results, clock):
    """Median seconds of each phase per variant, by wall clock or by the process's CPU time."""
    med = {v: {k: statistics.median(r[clock][k] for r in rs) for k in rs[0][clock]}
           for v, rs in results.items()}
    for m in med.values():
        m["first 3 steps beyond steady"] = m["first 3 steps"] - 3 * m["steady step"]
        m["total outside training"] = sum(m[k] for k in PHASES + (
            "first 3 steps beyond steady", "evaluate"))
    w = width(results)
    print(f"\n{clock + ' seconds':30s}" + "".join(f"{v:>{w}s}" for v in med))
    for k in PHASES + ("first 3 steps beyond steady", "evaluate", "total outside training",
                       "steady step"):
        print(f"{k:30s}" + "".join(f"{m[k]:>{w}.2f}" for m in med.values()))

if __name__ == "__main__":
    main()
