"""Strategies side by side: the same number of trials each, best val_bpb after N.

    python bench/strategies.py [--trials 6] [--budget 10] [--profile cpu] [--seed 0]
    python bench/strategies.py --strategies llm centaur --llm-base-url http://localhost:11434/v1 --llm-model qwen2.5:7b

Each strategy runs `loop.py --trials N` from the same train.py in its own scratch directory
(its own baseline, so the baseline's noise shows too). llm and centaur run only when an endpoint
is configured (OPENAI_API_KEY or --llm-base-url).
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
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--budget", type=float, default=10.0)
    ap.add_argument("--profile", default="cpu", choices=list(prepare.PROFILES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--strategies", nargs="+")
    ap.add_argument("--llm-base-url")
    ap.add_argument("--llm-model")
    args = ap.parse_args()
    strategies = args.strategies or ["random", "greedy", "tpe", "cmaes"] + (
        ["llm", "centaur"] if args.llm_base_url or os.environ.get("OPENAI_API_KEY") else [])
    profile = prepare.PROFILES[args.profile]
    source = prepare.python_source() if profile.source == "python" else prepare.synthetic_source()
    data = prepare.prepare(profile, source, prepare.cache_dir(), log=lambda *a: None)
    results = []
    for strategy in strategies:
        work = tempfile.mkdtemp(prefix=f"bench-{strategy}-")
        for name in ("train.py", "search_space.yaml"):
            shutil.copy(os.path.join(ROOT, name), work)
        cmd = [sys.executable, os.path.join(ROOT, "loop.py"), "--trials", str(args.trials),
               "--budget", str(args.budget), "--strategy", strategy, "--seed", str(args.seed)]
        if args.llm_base_url:
            cmd += ["--llm-base-url", args.llm_base_url]
        if args.llm_model:
            cmd += ["--llm-model", args.llm_model]
        t0 = time.time()
        subprocess.run(cmd, cwd=work, env=dict(os.environ, AUTORESEARCH_DATA=data), check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        df = pd.read_csv(os.path.join(work, "results.tsv"), sep="\t")
        ok = df[df.status != "crash"]
        results.append({"strategy": strategy, "baseline": df.val_bpb[0],
                        "best": ok.val_bpb.min(), "gain": df.val_bpb[0] - ok.val_bpb.min(),
                        "keeps": int((df.status[1:] == "keep").sum()),
                        "crashes": int((df.status == "crash").sum()),
                        "minutes": (time.time() - t0) / 60})
        shutil.rmtree(work)
        print(f"{strategy} done", file=sys.stderr, flush=True)
    print(f"profile {args.profile}, budget {args.budget:g}s, {args.trials} trials after the "
          f"baseline, proposer seed {args.seed}")
    print(pd.DataFrame(results).to_string(index=False, float_format=lambda v: f"{v:.4f}"))


if __name__ == "__main__":
    main()
