"""The morning-after summary and plot, on hand-written histories (new and 20-column files)."""
import json
import math

import pytest
from scipy import stats

from autoresearch import history, judge
from autoresearch import ledger as L
from autoresearch.report import format_summary, load_results, plot_progress, summarize

BASE = {"LR": 0.01}


def write(path, rows, columns=None):
    """rows: (status, val_bpb, description, error, params, strategy, seed). Config ids, run
    counts and means as the loop writes them."""
    lines = []
    seen = {}
    for i, (status, val, desc, error, params, strategy, seed) in enumerate(rows):
        config = history.config_id(params)
        values = seen.setdefault(config, [])
        if status != "crash":
            values.append(val)
        lines.append(L.format_row({"commit": f"c{i:06d}", "val_bpb": val, "memory_gb": 1.0, "status": status,
                       "description": desc, "trial": i, "started_at": L.now_iso(),
                       "strategy": strategy, "profile": "cpu", "seed": seed,
                       "changes": {k: v for k, v in params.items() if BASE.get(k) != v},
                       "params": params, "training_seconds": 60.0, "total_seconds": 64.0,
                       "mfu_percent": 0, "num_steps": 100 + i, "total_tokens_M": 0.8,
                       "num_params_M": 1.2, "error": error, "log": f"runs/{i:04d}/run.log",
                       "config": config, "runs": len(values),
                       "mean_bpb": sum(values) / len(values) if status != "crash" else 0.0,
                       "worker": "box/cpu"}))
    L.write_atomic(str(path), L.HEADER + "".join(lines))
    if columns == "legacy":  # as written before the last four columns existed
        lines = open(path).read().splitlines()
        open(path, "w").write("".join("\t".join(line.split("\t")[:20]) + "\n" for line in lines))
    return str(path)


A, B, C = {"LR": 0.02}, {"LR": 0.04}, {"LR": 0.08}
HISTORY = [
    ("keep", 1.000, "baseline", "", BASE, "baseline", 42),
    ("keep", 1.010, "baseline (run 2/3)", "", BASE, "baseline", 43),
    ("keep", 0.990, "baseline (run 3/3)", "", BASE, "baseline", 44),
    ("retest", 0.970, "LR 0.01->0.02", "", A, "greedy", 42),
    ("keep", 1.005, "incumbent re-run 4 (during the race)", "", BASE, "baseline", 45),
    ("keep", 0.975, "retest 2/3: LR 0.01->0.02", "", A, "greedy", 43),
    ("discard", 1.02, "LR 0.02->0.04", "", B, "greedy", 42),
    ("crash", 0.0, "LR 0.02->0.08", "oom", C, "greedy", 42),
]


def test_summary_states_means_their_runs_and_the_noise(tmp_path):
    s = summarize(load_results(write(tmp_path / "results.tsv", HISTORY)))
    assert (s["runs"], s["configs"], s["keeps"], s["discards"], s["crashes"]) == (8, 3, 1, 1, 1)
    base, inc = [1.0, 1.01, 0.99, 1.005], [0.97, 0.975]
    assert s["baseline"]["runs"] == 4 and s["baseline"]["mean"] == pytest.approx(sum(base) / 4)
    assert s["incumbent"]["runs"] == 2 and s["incumbent"]["mean"] == pytest.approx(0.9725)
    assert s["incumbent"]["se"] == pytest.approx(0.0025)  # std 0.003536 / sqrt(2)
    # the pooled floor, by hand: squares over both repeated configs, 3 + 1 degrees of freedom
    mb = sum(base) / 4
    squares = sum((v - mb) ** 2 for v in base) + sum((v - 0.9725) ** 2 for v in inc)
    sigma = math.sqrt(squares / 4)
    assert s["noise"].std == pytest.approx(sigma) and s["noise"].dof == 4
    gain, half = s["gain"]
    assert gain == pytest.approx(mb - 0.9725)
    assert half == pytest.approx(stats.t.ppf(0.975, 4) * sigma * math.sqrt(1 / 4 + 1 / 2))
    text = format_summary(s)
    assert "incumbent: 0.972500 +- 0.002500 (mean of 2 runs" in text
    assert "baseline:  1.001250" in text and "(mean of 4 runs" in text
    assert f"confirmed gain: {gain:.6f} +- {half:.6f} (95% interval" in text
    assert "lowest single run: 0.970000 (trial 3; one run, luck included)" in text
    assert "oom x1" in text and "noise floor: val_bpb std" in text
    assert [h["trial"] for h in s["top_hits"]] == [5] and s["top_hits"][0]["runs"] == 2


# `loop.py recheck --runs 2` after HISTORY: the baseline and the incumbent on fresh SEEDs
RECHECK = [("discard", 1.00, "recheck 1/2 of the baseline", "", BASE, "recheck", 46),
           ("keep", 0.985, "recheck 1/2 of the incumbent", "", A, "recheck", 44),
           ("discard", 0.99, "recheck 2/2 of the baseline", "", BASE, "recheck", 47),
           ("keep", 0.975, "recheck 2/2 of the incumbent", "", A, "recheck", 45)]


def test_recheck_rows_show_how_much_gain_survives(tmp_path):
    s = summarize(load_results(write(tmp_path / "results.tsv", HISTORY + RECHECK)))
    r = s["recheck"]
    assert r["recorded_gain"] == pytest.approx(1.00125 - 0.9725)
    assert r["rechecked_gain"] == pytest.approx(0.995 - 0.98)
    assert r["retained"] == pytest.approx(0.015 / 0.02875)
    assert "52% of the recorded gain survives" in format_summary(s)
    assert s["incumbent"]["runs"] == 4  # recheck runs are runs like any other


def test_a_20_column_file_loads_and_reports(tmp_path):
    path = write(tmp_path / "results.tsv", [
        ("keep", 1.0, "baseline", "", BASE, "baseline", 42),
        ("keep", 0.99, "LR 0.01->0.02", "", A, "greedy", 42),
        ("discard", 0.995, "LR 0.02->0.04", "", B, "greedy", 42),
        ("discard", 0.98, "LR 0.02->0.04 again", "", B, "greedy", 43)], columns="legacy")
    assert open(path).readline().rstrip("\n").split("\t") == L.LEGACY_COLUMNS
    df = load_results(path)
    assert df.config.tolist()[3] == df.config.tolist()[2] == history.config_id(B)
    assert df.runs.tolist() == [1, 1, 1, 2] and df.mean_bpb.tolist()[3] == pytest.approx(0.9875)
    s = summarize(df)
    assert s["incumbent"]["mean"] == 0.99 and s["noise"].runs == 2


def test_load_results_types(tmp_path):
    df = load_results(write(tmp_path / "results.tsv", HISTORY))
    assert df.val_bpb.dtype == float and df.trial.dtype == int and df.num_steps.dtype == int
    assert df.runs.dtype == int and df.mean_bpb.dtype == float
    assert df.error.tolist()[-1] == "oom" and df.error.tolist()[0] == ""
    assert df.commit.tolist()[0] == "c000000"  # text stays text (no numeric coercion)


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="loop.py"):
        load_results(str(tmp_path / "nope.tsv"))
    (tmp_path / "x.tsv").write_text("a\tb\n1\t2\n")
    with pytest.raises(ValueError, match="x.tsv is not a results.tsv"):
        load_results(str(tmp_path / "x.tsv"))


@pytest.mark.parametrize("rows", [HISTORY, HISTORY[:1], [("crash", 0.0, "baseline", "timeout", BASE,
                                                          "baseline", 42)]])
def test_plot_is_written(tmp_path, rows):
    df = load_results(write(tmp_path / "results.tsv", rows))
    path = plot_progress(df, str(tmp_path / "progress.png"))
    data = open(path, "rb").read()
    assert data[:4] == b"\x89PNG" and len(data) > 5000
    assert format_summary(summarize(df))  # no history too small to summarise


def test_noise_floor_pools_configs_that_ran_more_than_once():
    def row(trial, val, lr, status="discard", error=""):
        return {"trial": trial, "status": status, "val_bpb": f"{val:.6f}", "error": error,
                "params": json.dumps({"LR": lr}), "seed": trial}
    configs = history.configs_of(history.runs_of([row(0, 1.0, 0.04), row(1, 1.1, 0.05)]))
    assert judge.noise_floor(configs) is None
    configs = history.configs_of(history.runs_of([
        row(0, 1.00, 0.04), row(1, 1.02, 0.04), row(2, 0.5, 0.05), row(3, 0.52, 0.05),
        row(4, 0.9, 0.04, "crash", "oom")]))
    noise = judge.noise_floor(configs)
    assert noise.std == pytest.approx(0.01 * 2 ** 0.5) and noise.runs == 4 and noise.dof == 2
    assert noise.configs == 2
