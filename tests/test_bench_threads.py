"""bench/threads.py: the real runner trains each thread count in turn and the table reports
what it trained, so the benchmark behind BENCHMARKS.md's figures cannot rot."""
import importlib.util
import os
import re

import pytest

from conftest import ROOT

_spec = importlib.util.spec_from_file_location("bench_threads",
                                               os.path.join(ROOT, "bench", "threads.py"))
threads = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(threads)


@pytest.mark.slow
def test_each_thread_count_trains_every_round_and_the_table_reports_it(smoke_data, capsys):
    assert threads.main(["--budget", "2", "--rounds", "2", "--threads", "1", "2",
                         "--set", "DEPTH=1", "--data-dir", smoke_data.dir]) == 0
    out = capsys.readouterr().out
    assert "config {'DEPTH': 1}" in out
    runs = re.findall(r"^SEED (\d) threads (\d): val_bpb ([\d.]+) steps (\d+)", out, re.M)
    assert [(s, t) for s, t, _, _ in runs] == [("1", "1"), ("1", "2"), ("2", "1"), ("2", "2")]
    assert all(float(bpb) > 0 and int(steps) > 0 for _, _, bpb, steps in runs)
    for t in ("1", "2"):
        row = re.search(rf"^\| {t} \| 2 \| ([\d.]+) \+- ", out, re.M)
        steps = [int(n) for _, th, _, n in runs if th == t]
        assert row and float(row.group(1)) == pytest.approx(sum(steps) / 2)


def test_a_setting_without_a_value_is_refused_with_the_form_to_write():
    with pytest.raises(SystemExit, match="NAME=VALUE"):
        threads._setting("DEPTH")
