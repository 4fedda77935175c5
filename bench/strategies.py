"""Strategies side by side: the same number of runs each, and what each confirmed.

    python bench/strategies.py [--runs 19] [--budget 10] [--profile cpu] [--seed 0] [--judge noise]
    python bench/strategies.py --strategies llm centaur --llm-gguf ~/.cache/autoresearch/models/SmolLM2-135M-Instruct.Q4_1.gguf
    python bench/strategies.py --strategies llm --llm-base-url http://localhost:11434/v1 --llm-model qwen2.5:7b

Each strategy runs `loop.py --trials N` (N runs, the baseline's included) from the same train.py
in its own scratch directory, one after another. Reported per strategy: the baseline and the
incumbent as means with their run counts, the gain between them, the configs kept and the
crashes; for the LLM strategies, how their proposals went (valid at once, after the repair
round, fallen back) and what they cost (tokens, seconds). llm and centaur run only when an
endpoint is configured (--llm-gguf, --llm-base-url or OPENAI_API_KEY).
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
from autoresearch import report  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=19, help="runs per strategy, baseline included")
    ap.add_argument("--budget", type=float, default=10.0)
    ap.add_argument("--profile", default="cpu", choices=list(prepare.PROFILES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--judge", default="noise", choices=["noise", "threshold"])
    ap.add_argument("--strategies", nargs="+")
    ap.add_argument("--llm-base-url")
    ap.add_argument("--llm-model")
    ap.add_argument("--llm-gguf")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directories")
    args = ap.parse_args()
    endpoint = args.llm_gguf or args.llm_base_url or os.environ.get("OPENAI_API_KEY")
    strategies = args.strategies or ["random", "greedy", "tpe", "cmaes"] + (
        ["llm", "centaur"] if endpoint else [])
    profile = prepare.PROFILES[args.profile]
    source = prepare.python_source() if profile.source == "python" else prepare.synthetic_source()
    data = prepare.prepare(profile, source, prepare.cache_dir(), log=lambda *a: None)
    results = []
    for strategy in strategies:
        work = tempfile.mkdtemp(prefix=f"bench-{strategy}-")
        for name in ("train.py", "search_space.yaml"):
            shutil.copy(os.path.join(ROOT, name), work)
        cmd = [sys.executable, os.path.join(ROOT, "loop.py"), "--trials", str(args.runs),
               "--budget", str(args.budget), "--strategy", strategy, "--seed", str(args.seed),
               "--judge", args.judge]
        if strategy in ("llm", "centaur"):
            for flag, value in (("--llm-base-url", args.llm_base_url),
                                ("--llm-model", args.llm_model), ("--llm-gguf", args.llm_gguf)):
                if value:
                    cmd += [flag, value]
            cmd += ["--llm-timeout", "900"]
        t0 = time.time()
        proc = subprocess.run(cmd, cwd=work, env=dict(os.environ, AUTORESEARCH_DATA=data),
                              capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"{strategy} failed:\n{proc.stderr[-3000:]}")
        df = report.load_results(os.path.join(work, "results.tsv"))
        s = report.summarize(df, results_dir=work)
        row = {"strategy": strategy,
               "baseline": f"{s['baseline']['mean']:.4f} ({s['baseline']['runs']})",
               "incumbent": f"{s['incumbent']['mean']:.4f} ({s['incumbent']['runs']})",
               "gain": s["baseline"]["mean"] - s["incumbent"]["mean"],
               "kept": s["keeps"], "crashes": s["crashes"], "minutes": (time.time() - t0) / 60}
        for name, c in s["llm"].items():
            row |= {"llm": f"{c['valid']}/{c['repaired']}/{c['fallback']}",
                    "tokens": c["tokens"], "llm s": round(c["seconds"], 1)}
        results.append(row)
        print(f"{strategy} done ({work})", file=sys.stderr, flush=True)
        if not args.keep:
            shutil.rmtree(work)
    print(f"profile {args.profile}, budget {args.budget:g}s, {args.runs} runs per strategy "
          f"(baseline included), judge {args.judge}, proposer seed {args.seed}; baseline and "
          f"incumbent: mean val_bpb (runs); llm: proposals valid / after repair / fell back")
    print(pd.DataFrame(results).to_string(index=False, float_format=lambda v: f"{v:.4f}"))


if __name__ == "__main__":
    main()
