"""bench/judge.py's names for the judges it simulates: new@C weighs the confidence without a
copy of the defaults."""
import importlib.util
import os

import pytest

from conftest import ROOT

_spec = importlib.util.spec_from_file_location("bench_judge", os.path.join(ROOT, "bench", "judge.py"))
bench_judge = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_judge)


def test_new_at_a_confidence_is_the_new_judge_with_only_that_changed():
    at = bench_judge.judge_settings("new@0.8")
    assert at == dict(bench_judge.JUDGES["new"], confidence=0.8)
    first = bench_judge.judge_settings("new+first@0.9")
    assert first == dict(bench_judge.JUDGES["new"], first_confidence=0.9)
    assert bench_judge.judge_settings("threshold") is bench_judge.JUDGES["threshold"]


@pytest.mark.parametrize("name", ["new@1.5", "new@0.3", "new@", "newest", "new@0.8x",
                                  "new+first@1", "new+second@0.9"])
def test_other_names_are_refused_with_what_exists(name):
    with pytest.raises(SystemExit, match="new@C"):
        bench_judge.judge_settings(name)
