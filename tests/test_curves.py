"""A run's curve and signal from its log: synthetic shapes, logs of real cpu-profile runs, and
the real train.py on the smoke profile."""
import math
import os

import pytest

from autoresearch.curves import Curve, curve_of, curve_of_log, signal_of
from conftest import ROOT
from test_train import parse_summary, run_train

LOGS = os.path.join(ROOT, "tests", "fixtures", "logs")


def log_of(losses, tok_s=5000, fail=None, total=None):
    """A train.py log with one progress line per loss, evenly over the budget (of total lines)."""
    n = total or len(losses)
    lines = ["profile cpu | device cpu (float32) | params 1.18M | width 128 | depth 2 | budget 60s"]
    for i, loss in enumerate(losses):
        lines.append(f"step {i + 1:05d} | progress {(i + 1) / n:.3f} | loss {loss:.4f} | lrm 1.00 | "
                     f"dt 100ms | tok/s {tok_s:,.0f} | mfu 0.0% | epoch 1")
    if fail:
        lines.append(f"FAIL: {fail}: something")
    else:
        lines += ["---", "val_bpb:          1.700000"]
    return "\n".join(lines) + "\n"


def shape(f, n=100):
    return [f((i + 1) / n) for i in range(n)]


@pytest.mark.parametrize("losses, signal", [
    (shape(lambda p: 3 + 5 * math.exp(-3 * p)), "improving"),        # still 9% down in the last quarter
    (shape(lambda p: 3 + 5 * math.exp(-15 * p)), "plateaued"),       # flat long before the end
    (shape(lambda p: 3 + 5 * math.exp(-15 * p) + (0.08 if int(p * 100) % 2 else -0.08) * (p > 0.5)),
     "noisy"),
    (shape(lambda p: 3 + 5 * math.exp(-8 * p) + max(0, p - 0.6) * 2), "diverging"),
    (shape(lambda p: 3 + 5 * math.exp(-3 * p), n=3), ""),            # too few lines to say
])
def test_signals_of_synthetic_shapes(losses, signal):
    assert curve_of(log_of(losses)).signal == signal


def test_the_curve_and_its_line():
    curve = curve_of(log_of(shape(lambda p: 3 + 5 * math.exp(-3 * p)), tok_s=12345))
    assert curve.steps == 100 and curve.tok_s == 12345
    assert [round(x, 2) for x in curve.losses] == [6.70, 5.36, 4.12, 3.53, 3.25]
    assert curve.line() == "loss 6.70 5.36 4.12 3.53 3.25, 100 steps, 12.3k tok/s, improving"
    assert Curve.from_dict(curve.as_dict()) == curve


def test_a_failed_run():
    curve = curve_of(log_of(shape(lambda p: 3 + p * 10, n=20)[:8], fail="diverged", total=20))
    assert curve.signal == "diverging" and curve.failed == "diverged"
    assert curve.losses[2:] == [None, None, None]  # it stopped at 40%
    assert curve.line().startswith("loss 4.00 5.50 - - -, 8 steps")
    assert curve.line().endswith("diverging, FAIL: diverged")
    assert curve_of("Traceback ...\nFAIL: oom: DEVICE_BATCH_SIZE=64\n").line() == \
        "no progress lines (FAIL: oom)"
    assert signal_of([(0.1, float("nan"))], "nan") == "diverging"


def test_a_missing_log():
    assert curve_of_log("/nonexistent/run.log") is None


@pytest.mark.parametrize("name, steps, losses, signal", [
    # cpu profile, the 60 s budget on a 2-core machine busy with other jobs: 17 steps
    ("cpu-baseline.log", 17, [7.62, 7.30, 6.51, 6.16, 5.89], "improving"),
    # cpu profile, AUTORESEARCH_STEPS=60 (what an idle machine does in about 40 s)
    ("cpu-60-steps.log", 60, [6.95, 5.97, 5.15, 4.71, 4.48], "improving"),
    # smoke profile, 200 steps; then with EMBEDDING_LR 5 and UNEMBEDDING_LR 0.5, stopped at 91%
    ("smoke-200-steps.log", 200, [3.35, 2.54, 2.13, 1.99, 1.91], "improving"),
    ("smoke-high-lr-stopped.log", 182, [5.52, 5.03, 4.86, 4.73, None], "improving"),
])
def test_real_logs(name, steps, losses, signal):
    """Logs of the real train.py. Every real run here was short enough to be still learning at
    its end; the other signals are checked on the synthetic shapes above."""
    curve = curve_of_log(os.path.join(LOGS, name))
    assert curve.steps == steps and curve.signal == signal
    assert [x if x is None else round(x, 2) for x in curve.losses] == losses
    assert len(curve.line()) < 80


@pytest.mark.slow
def test_the_real_train_py_on_the_smoke_profile(tmp_path, smoke_data):
    # a fixed number of steps: a loaded machine may fit only one step into a short budget
    code, out = run_train(tmp_path, smoke_data, env={"AUTORESEARCH_STEPS": "20"})
    assert code == 0, out[-2000:]
    curve = curve_of(out)
    assert curve.steps == int(parse_summary(out)["num_steps"]) and curve.tok_s > 0
    assert curve.signal in ("improving", "plateaued", "noisy")
    assert curve.losses[0] > curve.losses[-1]  # it learned something
