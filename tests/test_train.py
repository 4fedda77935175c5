"""train.py really trains, on the smoke profile, for a few seconds; failures fail loudly."""
import math
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT

SUMMARY_KEYS = ["val_bpb", "training_seconds", "total_seconds", "peak_vram_mb", "mfu_percent",
                "total_tokens_M", "num_steps", "num_params_M", "depth", "startup_seconds",
                "eval_seconds", "device", "profile", "seed"]


def run_train(tmp_path, data, patches=(), env=None, wrapper=None, timeout=240):
    """Run a patched copy of train.py the way a trial does, from its own directory."""
    text = open(os.path.join(ROOT, "train.py")).read()
    for name, value in patches:
        text, n = re.subn(rf"^{name} = .*$", f"{name} = {value}", text, count=1, flags=re.M)
        assert n == 1, name
    script = tmp_path / "train.py"
    script.write_text(text)
    full_env = dict(os.environ, AUTORESEARCH_DATA=data.dir, PYTHONPATH=ROOT,
                    AUTORESEARCH_TIME_BUDGET="3", **(env or {}))
    cmd = [sys.executable, str(script)] if wrapper is None else [sys.executable, "-c", wrapper, str(script)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=full_env, capture_output=True, text=True,
                          timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


def parse_summary(out):
    assert "\n---\n" in out, out[-3000:]
    block = out.split("\n---\n")[-1]
    return dict(line.split(":", 1) for line in block.strip().splitlines())


def uniform_bpb(data):
    """What an untrained model (uniform over the vocabulary) scores on the validation rows."""
    split = data.split("val")
    tokens = split.tokens[:data.meta["eval"]["rows"] * data.profile.max_seq_len]
    nbytes = data.token_bytes[tokens]
    return (nbytes > 0).sum() * math.log2(data.vocab_size) / nbytes.sum()


def test_trains_and_prints_the_summary(tmp_path, smoke_data):
    code, out = run_train(tmp_path, smoke_data)
    assert code == 0, out[-3000:]
    summary = parse_summary(out)
    assert list(summary) == SUMMARY_KEYS
    val_bpb = float(summary["val_bpb"])
    assert math.isfinite(val_bpb)
    # Below an untrained model however few steps a loaded machine managed (the fixed-step test
    # below asks for a real margin), and never below what the process allows.
    assert smoke_data.floor_bpb < val_bpb < uniform_bpb(smoke_data)
    assert float(summary["training_seconds"]) >= 3.0
    assert int(summary["num_steps"]) > 0 and summary["profile"].strip() == "smoke"
    assert summary["device"].strip() == "cpu" and float(summary["mfu_percent"]) == 0
    # Progress lines, newline-terminated: at least every 2% of the budget (or every step where
    # one step takes longer than that), ending at 100%.
    reports = [(int(s), float(p)) for s, p in
               re.findall(r"^step (\d+) \| progress ([\d.]+) \|", out, re.M)]
    assert reports[-1][1] == 1.0
    for (s0, p0), (s1, p1) in zip([(0, 0.0)] + reports, reports):
        assert s1 == s0 + 1 or p1 - p0 <= 0.02, (s0, p0, s1, p1)


def test_same_seed_same_result(tmp_path, smoke_data):
    runs = {}
    for i, seed in enumerate([7, 7, 8]):
        d = tmp_path / str(i)
        d.mkdir()
        code, out = run_train(d, smoke_data, [("SEED", seed)], env={"AUTORESEARCH_STEPS": "30"})
        assert code == 0, out[-3000:]
        runs[i] = parse_summary(out)
    assert runs[0]["val_bpb"] == runs[1]["val_bpb"]
    assert runs[0]["val_bpb"] != runs[2]["val_bpb"]
    assert runs[0]["num_steps"].strip() == "30"
    # 30 steps are enough to be well below an untrained model, and still above the floor.
    assert smoke_data.floor_bpb < float(runs[0]["val_bpb"]) < 0.8 * uniform_bpb(smoke_data)


@pytest.mark.parametrize("patches,reason,needle", [
    ([("MATRIX_LR", "1e30")], "nan", "train loss is nan"),
    ([("UNEMBEDDING_LR", "3e3")], "diverged", "above a uniform guess"),
    ([("TOTAL_BATCH_SIZE", "1000")], "error", "TOTAL_BATCH_SIZE=1000 must be a positive multiple "
                                              "of DEVICE_BATCH_SIZE*MAX_SEQ_LEN"),
    ([("WINDOW_PATTERN", '"SXL"')], "error", "WINDOW_PATTERN='SXL'"),
])
def test_failures_print_their_fail_line(tmp_path, smoke_data, patches, reason, needle):
    code, out = run_train(tmp_path, smoke_data, patches)
    assert code != 0
    fail = [line for line in out.splitlines() if line.startswith("FAIL: ")]
    assert fail and fail[-1].startswith(f"FAIL: {reason}"), out[-3000:]
    assert needle in fail[-1]
    assert "\n---\n" not in out


def test_out_of_memory_is_reported_as_oom(tmp_path, smoke_data):
    """A real allocation failure: the address space is capped just above what torch needs."""
    wrapper = (
        "import re, resource, runpy, sys, torch\n"
        "vm = int(re.search(r'VmSize:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) * 1024\n"
        "resource.setrlimit(resource.RLIMIT_AS, (vm + 2**29, vm + 2**29))\n"
        "sys.argv = sys.argv[1:]\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    code, out = run_train(tmp_path, smoke_data, [("DEVICE_BATCH_SIZE", 4096),
                                                 ("TOTAL_BATCH_SIZE", 4096 * 128)],
                          wrapper=wrapper)
    assert code != 0
    assert "FAIL: oom DEVICE_BATCH_SIZE=4096" in out, out[-3000:]


def test_sliding_windows_are_applied(monkeypatch, smoke_data):
    """An S layer's query sees only its window; an L layer sees everything before it."""
    import importlib.util
    import torch
    monkeypatch.setenv("AUTORESEARCH_DATA", smoke_data.dir)
    monkeypatch.setenv("AUTORESEARCH_DEVICE", "cpu")
    spec = importlib.util.spec_from_file_location("train_module", os.path.join(ROOT, "train.py"))
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)  # defines everything; training only runs as __main__
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 8, 2, 4, generator=g) for _ in range(3))
    far = v.clone()
    far[:, :5] += 100.0  # keys 0..4 lie outside the last query's window of 3 (keys 5, 6, 7)
    windowed = train.attention(q, k, v, window=3)
    assert torch.allclose(windowed[:, 7], train.attention(q, k, far, window=3)[:, 7])
    assert not torch.allclose(train.attention(q, k, v, 8)[:, 7], train.attention(q, k, far, 8)[:, 7])
    # The first rows, whose whole past fits in the window, match full causal attention.
    assert torch.allclose(windowed[:, :3], train.attention(q, k, v, window=8)[:, :3], atol=1e-6)


def test_window_pattern_runs_with_short_windows(tmp_path, smoke_data):
    code, out = run_train(tmp_path, smoke_data, [("WINDOW_PATTERN", '"SSL"'), ("DEPTH", 3)],
                          env={"AUTORESEARCH_STEPS": "3"})
    assert code == 0, out[-3000:]
    assert math.isfinite(float(parse_summary(out)["val_bpb"]))
