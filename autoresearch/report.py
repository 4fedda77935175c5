"""Reading results.tsv the next morning: a summary and the progress plot.

`python loop.py report` prints format_summary(summarize(df)) and writes progress.png; the
notebook calls the same functions.
"""
import json
import os

import pandas as pd

from autoresearch.judge import noise_floor
from autoresearch.ledger import COLUMNS

_FLOATS = ["val_bpb", "memory_gb", "training_seconds", "total_seconds", "mfu_percent",
           "total_tokens_M", "num_params_M"]
_INTS = ["trial", "num_steps"]


def load_results(path):
    """results.tsv as a DataFrame with numeric columns numeric and text columns never NaN."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no results file {path}: run `python loop.py` first")
    df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path} is not a results.tsv: missing column(s) {', '.join(missing)}")
    for c in _FLOATS:
        df[c] = pd.to_numeric(df[c], errors="coerce").fillna(0.0).astype(float)
    for c in _INTS:
        df[c] = pd.to_numeric(df[c], errors="coerce").fillna(0).astype(int)
    return df


def with_gains(df):
    """Rows in trial order with `best_before` (the best kept val_bpb before the row) and `gain`
    (how much a keep lowered it)."""
    df = df.sort_values("trial").copy()
    best, before = None, []
    for status, v in zip(df.status, df.val_bpb):
        before.append(best)
        if status == "keep" and (best is None or v < best):
            best = v
    df["best_before"] = [float("nan") if b is None else b for b in before]
    df["gain"] = (df.best_before - df.val_bpb).where(df.status == "keep", 0.0).fillna(0.0)
    return df


def summarize(df, top=5):
    df = with_gains(df)
    is_base = df.description == "baseline"
    trials = df[~is_base]
    keeps = df[df.status == "keep"]
    baseline = float(df[is_base].val_bpb.iloc[0]) if is_base.any() and \
        df[is_base].status.iloc[0] == "keep" else None
    best = float(keeps.val_bpb.min()) if len(keeps) else None
    improvement = baseline - best if baseline is not None and best is not None else None
    hits = trials[trials.status == "keep"].sort_values("gain", ascending=False).head(top)
    return {
        "trials": len(trials), "keeps": int((trials.status == "keep").sum()),
        "discards": int((trials.status == "discard").sum()),
        "crashes": int((df.status == "crash").sum()),
        "keep_rate": float((trials.status == "keep").mean()) if len(trials) else 0.0,
        "baseline": baseline, "best": best, "improvement": improvement,
        "improvement_percent": 100 * improvement / baseline if improvement is not None else None,
        "crash_reasons": df[df.status == "crash"].error.value_counts().to_dict(),
        "noise": noise_floor(df.to_dict("records")),
        "top_hits": [{"trial": int(r.trial), "val_bpb": float(r.val_bpb), "gain": float(r.gain),
                      "description": r.description, "changes": json.loads(r.changes or "{}")}
                     for r in hits.itertuples()],
    }


def format_summary(s):
    lines = [f"trials: {s['trials']} after the baseline | keeps {s['keeps']} | discards "
             f"{s['discards']} | crashes {s['crashes']} | keep rate {100 * s['keep_rate']:.0f}%"]
    if s["crash_reasons"]:
        lines.append("crashes: " + ", ".join(f"{k or '?'} x{v}" for k, v in s["crash_reasons"].items()))
    lines.append(f"baseline: {s['baseline']:.6f}" if s["baseline"] is not None else "baseline: none")
    if s["best"] is not None:
        lines.append(f"best:     {s['best']:.6f}")
    if s["improvement"] is not None:
        lines.append(f"improvement: {s['improvement']:.6f} ({s['improvement_percent']:.2f}%)")
    if s["noise"]:
        lines.append(f"noise: val_bpb std {s['noise']['std']:.6f} over {s['noise']['runs']} runs "
                     f"of {s['noise']['configs']} repeated configuration(s)")
    if s["top_hits"]:
        lines.append("top hits by gain:")
        lines += [f"  #{h['trial']:<4} {h['val_bpb']:.6f}  -{h['gain']:.6f}  {h['description']}"
                  for h in s["top_hits"]]
    return "\n".join(lines)


def plot_progress(df, path):
    """Discards grey, keeps green with short labels, the running best as a step line, crashes
    as red marks along the bottom. Drawn without pyplot, so a notebook's backend is untouched."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    df = with_gains(df)
    fig = Figure(figsize=(11, 5.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ok = df[df.status != "crash"]
    disc, keep, crash = ok[ok.status == "discard"], ok[ok.status == "keep"], df[df.status == "crash"]
    ax.scatter(disc.trial, disc.val_bpb, s=18, color="#b0b0b0", label="discard", zorder=2)
    ax.scatter(keep.trial, keep.val_bpb, s=36, color="#2ca02c", label="keep", zorder=3)
    if len(keep):
        running = keep.val_bpb.cummin()
        last = df.trial.max()
        ax.step(list(keep.trial) + [last], list(running) + [running.iloc[-1]], where="post",
                color="#2ca02c", linewidth=1.2, alpha=0.8, label="best so far")
        for r in keep.itertuples():
            ax.annotate(r.description[:30], (r.trial, r.val_bpb), xytext=(4, 6),
                        textcoords="offset points", fontsize=7, rotation=20, color="#1b5e20")
    if len(ok):
        lo, hi = ok.val_bpb.min(), ok.val_bpb.max()
        pad = (hi - lo) * 0.08 or 0.01
        ax.set_ylim(lo - pad, hi + 3 * pad)
    if len(crash):
        ax.scatter(crash.trial, [0.02] * len(crash), marker="x", color="#d62728", s=30,
                   transform=ax.get_xaxis_transform(), label="crash", zorder=3, clip_on=False)
    trials = df[df.description != "baseline"]
    ax.set_title(f"autoresearch: {len(trials)} trials after the baseline, "
                 f"{int((trials.status == 'keep').sum())} kept, {len(crash)} crashed")
    ax.set_xlabel("trial")
    ax.set_ylabel("val_bpb (lower is better)")
    ax.grid(alpha=0.3)
    if len(df):
        ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path
