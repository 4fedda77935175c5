"""Reading results.tsv the next morning: a summary and the progress plot.

`python loop.py report` prints format_summary(summarize(df)) and writes progress.png; the
notebook calls the same functions. Every figure says how many runs stand behind it: the
incumbent and the baseline as means +- their standard errors, the gain between them with a 95%
interval from the pooled noise floor.
"""
import json
import math
import os

import pandas as pd
from scipy import stats

from autoresearch import history, trialdir
from autoresearch.judge import noise_floor
from autoresearch.ledger import COLUMNS, Ledger, LedgerError

_FLOATS = ["val_bpb", "memory_gb", "training_seconds", "total_seconds", "mfu_percent",
           "total_tokens_M", "num_params_M", "mean_bpb"]
_INTS = ["trial", "num_steps", "runs"]


def load_results(path):
    """results.tsv as a DataFrame with numeric columns numeric and text columns never NaN.
    Files from before the config/runs/mean_bpb/worker columns load with them filled in."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no results file {path}: run `python loop.py` first")
    try:
        rows = Ledger(path).rows()
    except LedgerError:
        raise ValueError(f"{path} is not a results.tsv: it lacks the results columns") from None
    df = pd.DataFrame(rows, columns=COLUMNS).fillna("")
    for c in _FLOATS:
        df[c] = pd.to_numeric(df[c], errors="coerce").fillna(0.0).astype(float)
    for c in _INTS:
        df[c] = pd.to_numeric(df[c], errors="coerce").fillna(0).astype(int)
    return df


def _runs(df):
    return history.runs_of(df.to_dict("records"))


def _estimate(config):
    """mean, standard error (None from one run) and run count of a config."""
    if config is None or not config.n:
        return None
    se = config.std / math.sqrt(config.n) if config.std is not None else None
    return {"id": config.id, "mean": config.mean, "se": se, "runs": config.n}


def gain_interval(base, inc, noise, level=0.95):
    """(gain, half-width) of baseline mean - incumbent mean, from the pooled noise floor."""
    if base is None or inc is None or noise is None:
        return None
    se = noise.std * math.sqrt(1 / base.n + 1 / inc.n)
    half = float(stats.t.ppf(0.5 + level / 2, noise.dof)) * se
    return base.mean - inc.mean, half


def llm_costs(df, results_dir):
    """Per strategy: LLM proposals, tokens, seconds and how they went (valid at once, after
    the repair round, fallen back), from the proposal.json kept beside each run's log."""
    out = {}
    for strategy, log in zip(df.strategy, df.log):
        p = trialdir.read_proposal(results_dir, log)
        if p is None:
            continue
        c = out.setdefault(strategy, {"proposals": 0, "tokens": 0, "seconds": 0.0, "valid": 0,
                                      "repaired": 0, "fallback": 0})
        c["proposals"] += 1
        c["tokens"] += p.get("tokens", 0)
        c["seconds"] += p.get("seconds", 0.0)
        c[p.get("outcome", "fallback")] = c.get(p.get("outcome", "fallback"), 0) + 1
    return out


def curve_line(results_dir, log):
    """The curve line of a run (curves.py), or None where its log is not on this machine."""
    curve = trialdir.curve(results_dir, log, keep=False)
    return curve.line() if curve is not None else None


def summarize(df, top=5, results_dir=None):
    runs = _runs(df)
    configs = history.configs_of(runs)
    inc = history.incumbent_of(runs, configs)
    noise = noise_floor(configs)
    first_base = min((r for r in runs if r.kind == "baseline"), key=lambda r: r.trial, default=None)
    base = configs[first_base.config] if first_base else None
    challengers = [c for c in configs.values() if base is None or c.id != base.id]
    decided = [c for c in challengers if c.status in ("keep", "discard", history.PRUNED)]
    gain = gain_interval(base, inc, noise) if base is not None and inc is not None \
        and base.id != inc.id else None
    finished = [r for r in runs if r.finished]
    lowest = min(finished, key=lambda r: r.value) if finished else None
    return {
        "runs": len(runs), "configs": len(challengers),
        "keeps": sum(c.status == "keep" for c in challengers),
        "discards": sum(c.status == "discard" for c in challengers),
        "pruned": sum(c.status == history.PRUNED for c in challengers),
        "racing": sum(c.status == "retest" for c in challengers),
        "crashes": sum(r.status == "crash" for r in runs),
        "keep_rate": (sum(c.status == "keep" for c in decided) / len(decided)) if decided else 0.0,
        "noise": noise, "baseline": _estimate(base), "incumbent": _estimate(inc),
        "gain": gain,
        "lowest_run": {"trial": lowest.trial, "val_bpb": lowest.value} if lowest else None,
        "crash_reasons": pd.Series([r.error for r in runs if r.status == "crash"],
                                   dtype=str).value_counts().to_dict(),
        "top_hits": _hits(runs, configs)[:top],
        "recheck": recheck_of(runs, configs),
        "strategies": pd.Series([r.strategy for r in runs], dtype=str).value_counts().to_dict(),
        "llm": llm_costs(df, results_dir) if results_dir else {},
        "incumbent_curve": _latest_curve(runs, inc, results_dir),
        "pruning": pruning_of(runs, configs),
    }


AUDIT = "audit: would have been pruned"


def pruning_of(runs, configs):
    """What stopping runs early did: the runs stopped, the training seconds they used against
    what full runs used, and the audit (runs the rule would have stopped but let finish): how
    many of their configs were kept anyway, the false-prune rate measured where the user runs.
    None when no run was stopped or audited."""
    pruned = [r for r in runs if r.status == history.PRUNED]
    audited = [r for r in runs if AUDIT in r.description]
    if not pruned and not audited:
        return None
    full = [float(r.row.get("training_seconds") or 0) for r in runs if r.finished]
    per_run = sum(full) / len(full) if full else 0.0
    used = sum(float(r.row.get("training_seconds") or 0) for r in pruned)
    saved = max(0.0, per_run * len(pruned) - used)
    kept = sorted({r.config for r in audited if configs[r.config].status == "keep"})
    return {"pruned": len(pruned), "pruned_seconds": used, "saved_seconds": saved,
            "saved_share": saved / (sum(full) + used + saved) if full else 0.0,
            "audited": len(audited), "audited_kept": len(kept),
            "false_prune_rate": len(kept) / len({r.config for r in audited}) if audited else None}


def _latest_curve(runs, config, results_dir):
    if config is None or not results_dir:
        return None
    latest = max((r for r in runs if r.config == config.id and r.finished), key=lambda r: r.trial,
                 default=None)
    return curve_line(results_dir, latest.row.get("log")) if latest else None


def _hits(runs, configs):
    """Each config that became the incumbent, with how much lower its mean is than the mean of
    the incumbent it replaced (both over all their runs so far), largest first."""
    hits, current = [], None
    for r in sorted(runs, key=lambda r: r.trial):
        if r.status != "keep" or r.config == current:
            continue
        if current is not None:
            old, new = configs[current], configs[r.config]
            hits.append({"trial": r.trial, "config": new.id, "mean": new.mean, "runs": new.n,
                         "gain": old.mean - new.mean, "over_runs": old.n,
                         "description": new.description,
                         "changes": json.loads(r.row.get("changes") or "{}")})
        current = r.config
    return sorted(hits, key=lambda h: -h["gain"])


def recheck_of(runs, configs):
    """The recorded gain against what `loop.py recheck` measured again, or None."""
    checks = [r for r in runs if r.kind == "recheck" and r.finished]
    ids = sorted({r.config for r in checks}, key=lambda c: configs[c].first_trial)
    if len(ids) != 2:
        return None
    base_id, inc_id = ids  # the baseline ran first of the two
    before = {c: [r.value for r in runs if r.config == c and r.finished and r.kind != "recheck"]
              for c in ids}
    again = {c: [r.value for r in checks if r.config == c] for c in ids}
    if not all(before.values()):
        return None
    recorded = _mean(before[base_id]) - _mean(before[inc_id])
    rechecked = _mean(again[base_id]) - _mean(again[inc_id])
    return {"recorded_gain": recorded, "recorded_runs": {c: len(v) for c, v in before.items()},
            "rechecked_gain": rechecked, "rechecked_runs": {c: len(v) for c, v in again.items()},
            "retained": rechecked / recorded if recorded else None,
            "baseline": base_id, "incumbent": inc_id}


def _mean(values):
    return sum(values) / len(values)


def _pm(est):
    if est is None:
        return "none"
    se = f" +- {est['se']:.6f}" if est["se"] is not None else ""
    return f"{est['mean']:.6f}{se} (mean of {est['runs']} run{'s' if est['runs'] > 1 else ''}, config {est['id']})"


def format_recheck(r):
    if r is None:
        return "recheck: none yet (python loop.py recheck)"
    runs = r["rechecked_runs"]
    text = (f"recheck: recorded gain {r['recorded_gain']:.6f} (baseline over "
            f"{r['recorded_runs'][r['baseline']]} runs, incumbent over "
            f"{r['recorded_runs'][r['incumbent']]}); measured again {r['rechecked_gain']:.6f} "
            f"(fresh SEEDs, {runs[r['baseline']]} + {runs[r['incumbent']]} runs)")
    if r["retained"] is not None:
        text += f": {100 * r['retained']:.0f}% of the recorded gain survives"
    return text


def format_pruning(p):
    text = (f"pruned: {p['pruned']} run(s) stopped early, {p['pruned_seconds']:.0f} s of "
            f"training used, about {p['saved_seconds']:.0f} s saved "
            f"({100 * p['saved_share']:.0f}% of all training)")
    if p["audited"]:
        text += (f"; audit: {p['audited']} run(s) that would have been stopped ran to the end, "
                 f"{p['audited_kept']} of their configs kept (false-prune rate "
                 f"{100 * p['false_prune_rate']:.0f}%)")
    else:
        text += "; audit: none yet"
    return text


def format_summary(s):
    lines = [f"runs: {s['runs']} | configs tried after the baseline: {s['configs']} | kept "
             f"{s['keeps']} | discarded {s['discards']} | pruned {s['pruned']} | racing "
             f"{s['racing']} | crashed runs "
             f"{s['crashes']} | keep rate {100 * s['keep_rate']:.0f}%"]
    if s["crash_reasons"]:
        lines.append("crashes: " + ", ".join(f"{k or '?'} x{v}" for k, v in s["crash_reasons"].items()))
    noise = s["noise"]
    lines.append(f"noise floor: val_bpb std {noise.std:.6f} (pooled over {noise.runs} runs of "
                 f"{noise.configs} repeated config(s), {noise.dof} degrees of freedom)"
                 if noise else "noise floor: unknown (no config has run twice)")
    lines.append(f"baseline:  {_pm(s['baseline'])}")
    lines.append(f"incumbent: {_pm(s['incumbent'])}")
    if s["gain"] is not None:
        gain, half = s["gain"]
        percent = 100 * gain / s["baseline"]["mean"]
        lines.append(f"confirmed gain: {gain:.6f} +- {half:.6f} (95% interval; {percent:.2f}% "
                     f"of the baseline)")
    if s["lowest_run"]:
        lines.append(f"lowest single run: {s['lowest_run']['val_bpb']:.6f} (trial "
                     f"{s['lowest_run']['trial']}; one run, luck included)")
    if s.get("incumbent_curve"):
        lines.append(f"incumbent's latest run: {s['incumbent_curve']}")
    if s["top_hits"]:
        lines.append("kept configs by gain over the incumbent they replaced (means):")
        lines += [f"  #{h['trial']:<4} {h['mean']:.6f} over {h['runs']} run(s)  -{h['gain']:.6f}  "
                  f"{h['description']}" for h in s["top_hits"]]
    if s["recheck"] is not None:
        lines.append(format_recheck(s["recheck"]))
    if s.get("pruning"):
        lines.append(format_pruning(s["pruning"]))
    for strategy, c in sorted(s.get("llm", {}).items()):
        lines.append(f"llm cost ({strategy}): {c['proposals']} proposals, {c['tokens']} tokens, "
                     f"{c['seconds']:.1f} s; valid {c['valid']}, after repair {c['repaired']}, "
                     f"fell back {c['fallback']}")
    return "\n".join(lines)


def plot_progress(df, path):
    """Every run as a dot (grey: discarded or racing, green: runs of kept configs, red marks
    along the bottom: crashes, orange ones: runs stopped early) and the incumbent's mean as a
    step line. Drawn without pyplot, so a notebook's backend is untouched."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    df = df.sort_values("trial")
    fig = Figure(figsize=(11, 5.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ok = df[~df.status.isin(["crash", history.PRUNED])]
    pruned = df[df.status == history.PRUNED]
    other, keep, crash = ok[ok.status != "keep"], ok[ok.status == "keep"], df[df.status == "crash"]
    ax.scatter(other.trial, other.val_bpb, s=16, color="#b0b0b0", label="run (discarded or racing)",
               zorder=2)
    ax.scatter(keep.trial, keep.val_bpb, s=22, color="#2ca02c", alpha=0.8,
               label="run of the incumbent", zorder=3)
    if len(keep):
        means = keep.mean_bpb.where(keep.mean_bpb > 0, keep.val_bpb)
        last = df.trial.max()
        ax.step(list(keep.trial) + [last], list(means) + [means.iloc[-1]], where="post",
                color="#1b5e20", linewidth=1.4, label="incumbent (mean of its runs)")
        changed = keep[keep.config != keep.config.shift()]
        for r in changed.itertuples():
            ax.annotate(r.description[:30], (r.trial, r.mean_bpb or r.val_bpb), xytext=(4, 6),
                        textcoords="offset points", fontsize=7, rotation=20, color="#1b5e20")
    if len(ok):
        lo, hi = ok.val_bpb.min(), ok.val_bpb.max()
        pad = (hi - lo) * 0.08 or 0.01
        ax.set_ylim(lo - pad, hi + 3 * pad)
    if len(crash):
        ax.scatter(crash.trial, [0.02] * len(crash), marker="x", color="#d62728", s=30,
                   transform=ax.get_xaxis_transform(), label="crash", zorder=3, clip_on=False)
    if len(pruned):
        ax.scatter(pruned.trial, [0.02] * len(pruned), marker="v", color="#ff7f0e", s=24,
                   transform=ax.get_xaxis_transform(), label="stopped early (pruned)", zorder=3,
                   clip_on=False)
    kept = keep.config[keep.config != keep.config.shift()]
    ax.set_title(f"autoresearch: {len(df)} runs, {max(len(kept) - 1, 0)} kept change(s), "
                 f"{len(crash)} crashed" + (f", {len(pruned)} stopped early" if len(pruned) else ""))
    ax.set_xlabel("trial (run)")
    ax.set_ylabel("val_bpb (lower is better)")
    ax.grid(alpha=0.3)
    if len(df):
        ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path
