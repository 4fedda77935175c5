"""What a trial spends outside training, phase by phase, in fresh processes like the loop's.

    python bench/overhead.py [--profile cpu] [--repeat 3] [--compile] [--cold-cache]

Each repeat starts a new Python process that does what train.py does before and after its
timed loop, timing each phase: importing torch, loading the prepared data, train.py's own
module-level setup, building the model and optimizers, the first batch, the first training
step (with --compile: the compilation, i.e. the first steps minus steady steps), a steady step,
and the fixed evaluation. The parent times the bare interpreter (`python -c pass`) beside it.
--compile uses $AUTORESEARCH_CACHE/compile as train.py does (warm after the first repeat);
--cold-cache gives every repeat an empty compile cache instead, which is what every trial paid
before the cache was kept. Prints the median of each phase over the repeats.
"""
import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child(args):
    """One fresh process: the phases of a trial outside its timed loop."""
    t = [("start", time.time())]

    def mark(name):
        t.append((name, time.time()))

    import torch
    mark("import torch")
    sys.path.insert(0, ROOT)
    import prepare
    data = prepare.load_prepared()
    mark("load prepared data")
    spec = importlib.util.spec_from_file_location("train_module", os.path.join(ROOT, "train.py"))
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

    step()
    mark("first step")
    for _ in range(2):  # a compiled model may specialise once more after its first step
        step()
    mark("two more steps")
    steady = []
    for _ in range(args.steps):
        t0 = time.time()
        step()
        steady.append(time.time() - t0)
    mark("steady steps")
    with train.autocast:
        data.evaluate_bpb(model, train.DEVICE_BATCH_SIZE)
    mark("evaluate")
    phases = {b[0]: b[1] - a[1] for a, b in zip(t, t[1:])}
    phases["steady step"] = statistics.median(steady)
    print(json.dumps(phases))


def run_child(args, env):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--steps", str(args.steps)]
    t0 = time.time()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    wall = time.time() - t0
    return json.loads(out.strip().splitlines()[-1]), wall


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5, help="steady steps timed per repeat")
    ap.add_argument("--compile", action="store_true", help="AUTORESEARCH_COMPILE=1")
    ap.add_argument("--cold-cache", action="store_true", help="an empty compile cache each repeat")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    sys.path.insert(0, ROOT)
    import prepare
    profile = prepare.PROFILES[args.profile]
    source = prepare.python_source() if profile.source == "python" else prepare.synthetic_source()
    data_dir = os.environ.get("AUTORESEARCH_DATA") or prepare.prepare(
        profile, source, prepare.cache_dir(), log=lambda *a: None)
    env = dict(os.environ, AUTORESEARCH_DATA=data_dir, PYTHONPATH=ROOT,
               AUTORESEARCH_COMPILE="1" if args.compile else "0")
    rows, walls, bare = [], [], []
    for _ in range(args.repeat):
        t0 = time.time()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        bare.append(time.time() - t0)
        if args.cold_cache:
            cache = tempfile.mkdtemp(prefix="overhead-compile-")
            env["TORCHINDUCTOR_CACHE_DIR"], env["TRITON_CACHE_DIR"] = cache, cache
        phases, wall = run_child(args, env)
        rows.append(phases)
        walls.append(wall)
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    print(f"profile {args.profile}  compile {'on' if args.compile else 'off'}"
          f"{' (cold cache every repeat)' if args.cold_cache else ''}  median of {args.repeat} "
          f"fresh processes; load average {os.getloadavg()[0]:.1f}")
    print(f"  {'bare interpreter start+exit':32s} {statistics.median(bare):6.2f} s")
    for name in ("import torch", "load prepared data", "train.py setup", "build model",
                 "first batch"):
        print(f"  {name:32s} {med[name]:6.2f} s")
    first_extra = med["first step"] + med["two more steps"] - 3 * med["steady step"]
    print(f"  {'first 3 steps beyond steady':32s} {first_extra:6.2f} s"
          f"{'  (compilation)' if args.compile else ''}")
    print(f"  {'evaluate (fixed metric)':32s} {med['evaluate']:6.2f} s")
    outside = (sum(med[n] for n in ("import torch", "load prepared data", "train.py setup",
                                    "build model", "first batch", "evaluate")) + first_extra)
    print(f"  {'total outside training':32s} {outside:6.2f} s  (+ interpreter; steady step "
          f"{med['steady step'] * 1000:.0f} ms; process wall {statistics.median(walls):.1f} s)")
    print("  per repeat: " + "; ".join(
        f"first step {r['first step']:.1f} s, eval {r['evaluate']:.1f} s" for r in rows))


if __name__ == "__main__":
    main()
