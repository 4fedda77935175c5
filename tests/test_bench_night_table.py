"""bench/night_table.py: the real nights' rows in BENCHMARKS.md come from the results files, the
recheck kept apart from the loop's own figures."""
import importlib.util
import math
import os

import pytest

from conftest import ROOT
from test_report import BASE, HISTORY, RECHECK, write

_spec = importlib.util.spec_from_file_location("night_table",
                                               os.path.join(ROOT, "bench", "night_table.py"))
night_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(night_table)

# the threshold judge kept a single run of C, rechecked at 1.00 - 0.99 = 0.01
C = {"LR": 0.16}
THRESHOLD = [("keep", 1.000, "baseline", "", BASE, "baseline", 42),
             ("keep", 0.960, "LR 0.01->0.16", "", C, "greedy", 42),
             ("pruned", 0.0, "LR 0.16->0.32", "pruned at 10%: loss 7.1, incumbent 6.9 +- 0.1",
              {"LR": 0.32}, "greedy", 42),
             ("discard", 1.01, "recheck 1/1 of the baseline", "", BASE, "recheck", 43),
             ("keep", 1.00, "recheck 1/1 of the incumbent", "", C, "recheck", 43)]


def nights(tmp_path):
    dirs = []
    for name, rows in (("threshold-seed0", THRESHOLD), ("noise-seed0", HISTORY + RECHECK)):
        d = tmp_path / name
        d.mkdir()
        write(d / "results.tsv", rows)
        dirs.append(str(d))
    return dirs


def test_the_loops_figures_leave_the_recheck_out_and_the_ratio_is_per_seed(tmp_path, capsys):
    threshold, noise = nights(tmp_path)
    t, n = night_table.night(threshold), night_table.night(noise)
    assert (t["runs"], t["configs"], t["pruned"], t["keeps"]) == (3, 2, 1, 1)
    assert t["noise"] is None  # no config ran twice before the recheck
    assert (n["runs"], n["configs"], n["pruned"], n["keeps"]) == (8, 3, 0, 1)
    # the floor the judge saw: the loop's repeats only (the baseline's 4 runs, A's 2)
    base, inc = [1.0, 1.01, 0.99, 1.005], [0.97, 0.975]
    squares = sum((v - sum(base) / 4) ** 2 for v in base) + sum((v - 0.9725) ** 2 for v in inc)
    assert n["noise"] == pytest.approx(math.sqrt(squares / 4))
    assert n["recheck"]["rechecked_gain"] == pytest.approx(0.995 - 0.98)
    assert night_table.main([threshold, noise]) == 0
    out = capsys.readouterr().out
    assert "| threshold-seed0 | 3 | 2 | 1 |" in out and "| **0.0100** (25%) |" in out
    assert "| noise-seed0 | 8 | 3 | 0 | 0 s (0%) | 1 | 0.0288 | **0.0150** (52%) |" in out
    assert "seed 0: noise rechecked at 1.50x the threshold judge's gain (0.0150 vs 0.0100)" in out


def test_a_directory_without_results_is_named(tmp_path):
    with pytest.raises(SystemExit, match="no results.tsv"):
        night_table.night(str(tmp_path))
