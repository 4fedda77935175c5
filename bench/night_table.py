"""The rows BENCHMARKS.md gives for real nights (night_small.sh, night_pair.sh), read from each
night directory's results.tsv, so a table is never copied out of logs by hand.

    python bench/night_table.py NIGHT_DIR [NIGHT_DIR ...]

Each directory is one loop and its `loop.py recheck`, named <judge>-seed<N> as the night scripts
name them. One markdown row per directory: the loop's own runs (the recheck's aside), configs
tried after the baseline, runs stopped early and the training seconds that saved, keeps (times
the incumbent changed), the gain the loop recorded and the gain the recheck measured again on
fresh SEEDs, and the noise floor the judge saw at the loop's end. Then, per seed, each other
judge's rechecked gain as a multiple of the threshold judge's.
"""
import argparse
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from autoresearch import report  # noqa: E402

HEADER = ("| night | runs | configs tried | pruned | training saved | keeps | recorded gain | "
          "rechecked gain | noise floor |\n|---|---|---|---|---|---|---|---|---|")


def night(path):
    """The figures of one night directory (a dict), or a SystemExit saying what is missing."""
    results = os.path.join(path, "results.tsv")
    if not os.path.exists(results):
        raise SystemExit(f"{path}: no results.tsv (not a night directory)")
    df = report.load_results(results)
    loop = report.summarize(df[df["strategy"] != "recheck"], top=1000)
    whole = report.summarize(df)
    pruning = loop["pruning"] or {"pruned": 0, "saved_seconds": 0.0, "saved_share": 0.0}
    noise = loop["noise"]
    return {"name": os.path.basename(os.path.normpath(path)),
            "runs": loop["runs"], "configs": loop["configs"], "pruned": pruning["pruned"],
            "saved_seconds": pruning["saved_seconds"], "saved_share": pruning["saved_share"],
            "keeps": len(loop["top_hits"]), "recheck": whole["recheck"],
            "noise": noise.std if noise is not None else None}


def row(n):
    r = n["recheck"]
    recorded = f"{r['recorded_gain']:.4f}" if r else "none"
    rechecked = (f"**{r['rechecked_gain']:.4f}** ({r['retained']:.0%})" if r and r["retained"]
                 is not None else "none (nothing kept)")
    noise = f"{n['noise']:.3f}" if n["noise"] is not None else "unknown"
    return (f"| {n['name']} | {n['runs']} | {n['configs']} | {n['pruned']} | "
            f"{n['saved_seconds']:.0f} s ({n['saved_share']:.0%}) | {n['keeps']} | {recorded} | "
            f"{rechecked} | {noise} |")


def ratios(nights):
    """'seed N: <judge> 0.98x' lines: each judge's rechecked gain over the threshold judge's on
    the same seed (a night that kept nothing counts as a gain of 0)."""
    by_seed = {}
    for n in nights:
        m = re.fullmatch(r"(.+)-seed(\d+)", n["name"])
        if m:
            gain = n["recheck"]["rechecked_gain"] if n["recheck"] else 0.0
            by_seed.setdefault(int(m.group(2)), {})[m.group(1)] = gain
    lines = []
    for seed, gains in sorted(by_seed.items()):
        base = gains.get("threshold")
        for judge, gain in gains.items():
            if judge != "threshold" and base:
                lines.append(f"seed {seed}: {judge} rechecked at {gain / base:.2f}x the "
                             f"threshold judge's gain ({gain:.4f} vs {base:.4f})")
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("nights", nargs="+", help="night directories (<judge>-seed<N>)")
    args = ap.parse_args(argv)
    nights = [night(p) for p in args.nights]
    print(HEADER)
    for n in nights:
        print(row(n))
    for line in ratios(nights):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
