"""The morning-after summary and plot, on a hand-written history."""
import json

import pytest

from autoresearch import ledger as L
from autoresearch.judge import noise_floor
from autoresearch.report import format_summary, load_results, plot_progress, summarize


def write(path, rows):
    ledger = L.Ledger(str(path))
    for i, (status, val, desc, error) in enumerate(rows):
        ledger.append({"commit": f"c{i:06d}", "val_bpb": val, "memory_gb": 1.0, "status": status,
                       "description": desc, "trial": i, "started_at": L.now_iso(),
                       "strategy": "greedy", "profile": "cpu", "seed": 42,
                       "changes": {} if i == 0 else {"LR": 0.01 * i}, "params": {"LR": 0.01 * i},
                       "training_seconds": 60.0, "total_seconds": 64.0, "mfu_percent": 0,
                       "num_steps": 100 + i, "total_tokens_M": 0.8, "num_params_M": 1.2,
                       "error": error, "log": f"runs/{i:04d}/run.log"})
    return str(path)


HISTORY = [("keep", 1.0, "baseline", ""), ("keep", 0.99, "LR 0->0.01", ""),
           ("discard", 0.995, "LR 0.01->0.02", ""), ("crash", 0.0, "DEPTH 2->9", "oom"),
           ("keep", 0.97, "LR 0.01->0.04", ""), ("discard", 0.98, "LR 0.04->0.05", "")]


def test_load_results_types(tmp_path):
    df = load_results(write(tmp_path / "results.tsv", HISTORY))
    assert df.val_bpb.dtype == float and df.trial.dtype == int and df.num_steps.dtype == int
    assert df.error.tolist() == ["", "", "", "oom", "", ""]
    assert df.commit.tolist()[0] == "c000000"  # text stays text (no numeric coercion)


def test_summary_counts_and_top_hits(tmp_path):
    s = summarize(load_results(write(tmp_path / "results.tsv", HISTORY)))
    assert (s["trials"], s["keeps"], s["discards"], s["crashes"]) == (5, 2, 2, 1)
    assert s["keep_rate"] == pytest.approx(0.4)
    assert s["baseline"] == 1.0 and s["best"] == 0.97
    assert s["improvement"] == pytest.approx(0.03) and s["improvement_percent"] == pytest.approx(3.0)
    assert [h["trial"] for h in s["top_hits"]] == [4, 1]
    assert [round(h["gain"], 6) for h in s["top_hits"]] == [0.02, 0.01]
    text = format_summary(s)
    assert "best:     0.970000" in text and "#4" in text and "oom x1" in text


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="loop.py"):
        load_results(str(tmp_path / "nope.tsv"))
    (tmp_path / "x.tsv").write_text("a\tb\n1\t2\n")
    with pytest.raises(ValueError, match="x.tsv is not a results.tsv"):
        load_results(str(tmp_path / "x.tsv"))


@pytest.mark.parametrize("rows", [HISTORY, HISTORY[:1], [("crash", 0.0, "baseline", "timeout")]])
def test_plot_is_written(tmp_path, rows):
    df = load_results(write(tmp_path / "results.tsv", rows))
    path = plot_progress(df, str(tmp_path / "progress.png"))
    data = open(path, "rb").read()
    assert data[:4] == b"\x89PNG" and len(data) > 5000
    assert format_summary(summarize(df))  # no history too small to summarise


def test_noise_is_reported_once_a_configuration_repeats(tmp_path):
    path = write(tmp_path / "results.tsv", HISTORY)
    assert summarize(load_results(path))["noise"] is None
    L.Ledger(path).append({"val_bpb": 0.975, "status": "discard", "description": "LR 0.04 again",
                           "trial": 6, "params": {"LR": 0.04}, "profile": "cpu"})
    text = format_summary(summarize(load_results(path)))
    assert "noise: val_bpb std 0.003536 over 2 runs of 1 repeated configuration(s)" in text


def row(val, seed, status="discard", description="", **params):
    return {"status": status, "val_bpb": f"{val:.6f}", "description": description,
            "params": json.dumps({"SEED": seed, "LR": 0.04, **params})}


def test_noise_floor_from_repeated_configurations():
    assert noise_floor([row(1.0, 1), row(1.1, 1, LR=0.05)]) is None
    noise = noise_floor([row(1.00, 1), row(1.02, 2), row(0.5, 3, LR=0.05), row(0.52, 4, LR=0.05),
                         row(0.9, 5, status="crash"), row(0.1, 6, description="llm code: x")])
    assert noise["std"] == pytest.approx(0.01 * 2 ** 0.5) and noise["runs"] == 4
    assert noise["configs"] == 2
