"""bench/gpu_check.py: its CPU dry run end to end (so the GPU check cannot rot before a GPU is
lent), and the arithmetic and the reports behind its table."""
import importlib.util
import os
import re
import subprocess
import sys
import zipfile

import pytest

from conftest import ROOT

_spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "bench",
                                                                          "gpu_check.py"))
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)


def test_duty_cycle_extrapolates_fixed_costs_to_the_full_budget():
    assert gpu_check.duty_cycle(300, 0) == 1
    assert gpu_check.duty_cycle(300, 100) == pytest.approx(0.75)
    # the 97% goal leaves 300 / 0.97 - 300 = 9.28 s of fixed costs per 300 s trial
    assert gpu_check.fixed_budget_for(0.97) == pytest.approx(9.278, abs=1e-3)
    assert gpu_check.duty_cycle(300, gpu_check.fixed_budget_for(0.97)) == pytest.approx(0.97)
    # the same fixed seconds weigh less at the full budget than in a shortened run
    assert gpu_check.duty_cycle(300, 30) > gpu_check.duty_cycle(120, 30)


def test_tokens_per_second_leaves_out_the_compile_steps():
    summary = {"num_steps": "111", "training_seconds": "50.0"}
    assert gpu_check.timed_tokens_per_second(summary, 2**19, compiled=True) == 100 * 2**19 / 50
    assert gpu_check.timed_tokens_per_second(summary, 2**19, compiled=False) == 111 * 2**19 / 50


def test_summary_and_progress_lines_parse():
    log = ("profile h100 | device NVIDIA H200 (bf16, compiled)\n"
           "step 00001 | progress 0.000 | loss 9.0 | lrm 1.00 | dt 40000ms | tok/s 13,107 | "
           "mfu 1.0% | epoch 1\n"
           "step 00050 | progress 0.100 | loss 6.0 | lrm 1.00 | dt 400ms | tok/s 1,310,720 | "
           "mfu 44.5% | epoch 1\n"
           "---\nval_bpb:          1.234567\ncompile_seconds:  31.5\n"
           "device:           NVIDIA H200\n")
    summary = gpu_check.parse_summary(log)
    assert summary == {"val_bpb": "1.234567", "compile_seconds": "31.5", "device": "NVIDIA H200"}
    assert gpu_check.parse_summary("no summary here") == {}
    assert gpu_check.progress_figures(log) == [(1310720.0, 44.5)]  # the compile step left out


def test_missing_report_names_what_does_not_import_and_what_will_be_done(tmp_path):
    needs = {"json": ("json", "the standard library"),
             "gpu_check_absent": ("gpu-check-absent", "this test")}
    gone = gpu_check.missing(needs)
    assert gone == [("gpu_check_absent", "gpu-check-absent", "this test")]
    assert gpu_check.missing_report([], str(tmp_path)) == ["nothing missing"]
    line, = gpu_check.missing_report(gone, str(tmp_path))
    assert "missing gpu_check_absent (pip gpu-check-absent; for this test)" in line
    assert "bench/gpu_wheels.sh" in line
    make_wheel(tmp_path, "gpu_check_absent")
    line, = gpu_check.missing_report(gone, str(tmp_path))
    assert "installing gpu_check_absent-1.0-py3-none-any.whl offline" in line


def test_missing_packages_install_offline_from_the_wheels_folder(tmp_path):
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    wheels.mkdir()
    make_wheel(wheels, "gpu_check_absent")
    gone = gpu_check.missing({"gpu_check_absent": ("gpu-check-absent", "this test")})
    with open(tmp_path / "pip.log", "w") as log:
        assert gpu_check.install_wheels(gone, str(wheels), str(site), log) == ["gpu-check-absent"]
    out = subprocess.run([sys.executable, "-c", "import gpu_check_absent as m; print(m.VALUE)"],
                         env=dict(os.environ, PYTHONPATH=str(site)), capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "42"


def test_a_failed_or_late_step_is_a_row_and_a_hung_command_is_stopped(tmp_path):
    args = gpu_check.argparse.Namespace(dry_run=True, h100_budget=None, colab_budget=None,
                                        deadline=None)
    c = gpu_check.Check(gpu_check.make_plan(args), str(tmp_path), str(tmp_path))
    try:
        assert c.step("broken", lambda limit: 1 / 0, 60) is None
        rc, out, secs = c.run([sys.executable, "-c", "import time; print('started', flush=True); "
                               "time.sleep(60)"], limit=2)
        c.plan.deadline = 0  # the check's time is spent: later steps are skipped, not run
        assert c.step("late", lambda limit: pytest.fail("ran past the deadline"), 60) is None
    finally:
        c.close()
    assert (rc, "started" in out) == ("timeout", True) and secs < 30
    assert [(r.check, r.value) for r in c.rows] == [
        ("broken", "FAILED: ZeroDivisionError: division by zero"),
        ("late", "SKIPPED: the check's time is spent")]


def make_wheel(folder, module, version="1.0"):
    """A minimal pure-Python wheel, so the offline install is tested without a registry."""
    dist = f"{module}-{version}.dist-info"
    files = {f"{module}/__init__.py": "VALUE = 42\n",
             f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {module.replace('_', '-')}\n"
                                 f"Version: {version}\n",
             f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                              "Tag: py3-none-any\n"}
    files[f"{dist}/RECORD"] = "".join(f"{name},,\n" for name in files) + f"{dist}/RECORD,,\n"
    path = os.path.join(folder, f"{module}-{version}-py3-none-any.whl")
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return path


def table_rows(text):
    """{(check, figure): (value, goal)} of the markdown table gpu_check writes."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 4 and cells[0] != "check":
            rows[(cells[0], cells[1])] = (cells[2], cells[3])
    return rows


def number(text):
    """The first number of a cell ('1,234 s', '96.5% (10.8 s ...)', '1.28e-03')."""
    return float(re.match(r"[-+]?[\d,]*\.?\d+(?:e[-+]?\d+)?", text).group(0).replace(",", ""))


@pytest.mark.timeout(400)
def test_dry_run_walks_every_step_and_fills_the_table(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, AUTORESEARCH_CACHE=str(tmp_path / "cache"), PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_check.py"),
                           "--dry-run", "--out", str(out), "--wheels", str(tmp_path / "none")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=380)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = (out / "gpu_check.md").read_text()
    assert table.strip() in proc.stdout  # printed as written
    assert table.startswith("**DRY RUN on a CPU**")
    rows = table_rows(table)
    failed = {k: v for k, v in rows.items() if v[0].startswith(("FAILED", "SKIPPED", "STOPPED"))}
    assert not failed, failed

    base, colab, checks = "smoke baseline", "smoke fp16", "checks, bf16 (cpu)"
    expected = [
        ("DRY RUN", "on a CPU"),
        ("environment", "python, torch"), ("environment", "device"),
        ("environment", "missing before the check"),
        ("data", "smoke profile, synthetic source"),
        (base, "run"), (base, "trainer's first line"), (base, "tokens/s"), (base, "MFU"),
        (base, "start-up (before the first step)"),
        (base, "compile"), (base, "eval"), (base, "peak memory"), (base, "val_bpb, steps"),
        (base, "duty cycle at 300 s, one cold trial"),
        (base, "duty cycle at 300 s, the trainer's fixed costs only"),
        (colab, "run"), (colab, "val_bpb, steps, MFU, peak memory"),
        (checks, "causal model, after 5 steps: causality, largest change"),
        (checks, "causal model: statelessness, largest change"),
        (checks, "causal model: prepare's own check"),
        (checks, "non-causal model, after 5 steps: causality, largest change"),
        (checks, "non-causal model: statelessness, largest change"),
        (checks, "non-causal model: prepare's own check"),
        ("sandbox", "bubblewrap probe"), ("sandbox", "GPU device nodes passed through"),
        ("sandbox", "one trial through loop.py --sandbox auto"),
        ("sandbox", "RLIMIT_DATA next to CUDA"),
        ("whole check", "wall"),
    ]
    assert [k for k in expected if k not in rows] == []

    assert rows[(base, "run")][0].startswith("ok: loop.py --trials 1, budget 3 s")
    assert rows[(colab, "run")][0].startswith("ok: budget 2 s")
    assert "(fp16)" in rows[(colab, "run")][0]
    assert "AUTORESEARCH_DTYPE=fp16" in rows[(colab, "run")][0]
    assert number(rows[(base, "tokens/s")][0]) > 0
    assert 0 <= number(rows[(base, "MFU")][0]) <= 100
    for figure in ("start-up (before the first step)", "eval", "peak memory"):
        assert number(rows[(base, figure)][0]) >= 0
    val_bpb = number(rows[(base, "val_bpb, steps")][0])
    assert 0 < val_bpb < 20
    cold = rows[(base, "duty cycle at 300 s, one cold trial")][0]
    trainer = rows[(base, "duty cycle at 300 s, the trainer's fixed costs only")][0]
    fixed_cold = float(re.search(r"\(([\d.]+) s", cold).group(1))
    assert number(cold) == pytest.approx(100 * gpu_check.duty_cycle(300, fixed_cold), abs=0.06)
    assert 0 < number(cold) <= number(trainer) <= 100  # the loop's costs come on top

    tol = 1e-3
    assert number(rows[(checks, "causal model, after 5 steps: causality, "
                               "largest change")][0]) <= tol
    assert number(rows[(checks, "causal model: statelessness, largest change")][0]) <= tol
    assert rows[(checks, "causal model: prepare's own check")][0] == "pass"
    assert number(rows[(checks, "non-causal model, after 5 steps: causality, "
                               "largest change")][0]) > tol
    assert rows[(checks, "non-causal model: prepare's own check")][0] == "non-causal"

    sandboxed = rows[("sandbox", "one trial through loop.py --sandbox auto")][0]
    assert sandboxed.startswith("ok; ") and re.search(r"memory limit: [\d.]+ GiB$", sandboxed)
    assert number(rows[("sandbox", "RLIMIT_DATA next to CUDA")][0]) >= 1
    assert number(rows[("whole check", "wall")][0]) > 0
    log = (out / "gpu_check.log").read_text()
    assert "budget 3s (limit 153s)" in log  # loop.py took --grace: the full budget's 150 s
    assert (out / "gpu_check.json").exists()
