"""Run one trial: its own directory, train.py as a subprocess in its own process group, a time
limit, the log streamed live, the summary parsed, failures classified."""
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUMMARY_KEYS = ("val_bpb", "training_seconds", "total_seconds", "peak_vram_mb", "mfu_percent",
                "total_tokens_M", "num_steps", "num_params_M", "depth")
FAIL_REASONS = ("nan", "diverged", "oom", "error")
# Nothing secret reaches the trainer: it never needs an API key, and code mode runs LLM text.
_SECRET = re.compile(r"(API_KEY|APIKEY|TOKEN|SECRET|PASSWORD)", re.I)
_PROGRESS = re.compile(r"^step (\d+) \| progress ([\d.]+) \| loss ([\d.]+)")
_EXCEPTION = re.compile(r"^([A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b.*)$")


@dataclass
class Outcome:
    ok: bool
    error: str = ""               # crash reason: timeout, oom, nan, diverged, error: ..., interrupted
    summary: dict = field(default_factory=dict)
    returncode: int = None
    wall_seconds: float = 0.0
    log: str = ""


def clean_env(data_dir=None, extra=None):
    env = {k: v for k, v in os.environ.items() if not _SECRET.search(k)}
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    if data_dir:
        env["AUTORESEARCH_DATA"] = data_dir
    env.update(extra or {})
    return env


def run_trial(trial_dir, source, time_limit, data_dir=None, env=None, on_line=None):
    """Write `source` as trial_dir/train.py, run it, and return an Outcome. Ctrl-C (SIGINT)
    kills the whole process group and returns an 'interrupted' Outcome (the caller re-raises)."""
    os.makedirs(trial_dir, exist_ok=True)
    script = os.path.join(trial_dir, "train.py")
    with open(script, "w") as f:
        f.write(source)
    log_path = os.path.join(trial_dir, "run.log")
    t0 = time.time()
    lines = []
    stop = threading.Event()
    previous = _catch_interrupt(stop)
    try:
        with open(log_path, "w") as log:
            proc = subprocess.Popen([sys.executable, "train.py"], cwd=trial_dir,
                                    env=clean_env(data_dir, env), stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, text=True, errors="replace",
                                    bufsize=1, preexec_fn=die_with_parent)

            def pump():  # a thread, so the time limit holds even when the trainer prints nothing
                for line in proc.stdout:
                    log.write(line)
                    log.flush()
                    lines.append(line.rstrip("\n"))
                    if on_line is not None:
                        on_line(line.rstrip("\n"))

            reader = threading.Thread(target=pump, daemon=True)
            reader.start()
            error = _wait(proc, time_limit, stop)
            if error:
                kill_group(proc)
            reader.join(timeout=10)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    if error == "interrupted":
        return Outcome(False, "interrupted", {}, proc.returncode, time.time() - t0, log_path)
    outcome = classify(lines, proc.returncode, error)
    outcome.wall_seconds = time.time() - t0
    outcome.log = log_path
    return outcome


def _catch_interrupt(stop):
    """While a trial runs, Ctrl-C only sets `stop`. A KeyboardInterrupt raised instead can land
    inside the fork that starts the trainer, where Python prints and drops it ("Exception
    ignored in ... _releaseLock"), and the loop would run on. Returns the handler to restore, or
    None outside the main thread (where no signal arrives anyway)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGINT, lambda signum, frame: stop.set())


def _wait(proc, time_limit, stop):
    """'' when the trainer exits by itself, 'timeout' past the limit, 'interrupted' on Ctrl-C."""
    deadline = time.monotonic() + time_limit
    while proc.poll() is None:
        remaining = deadline - time.monotonic()
        if stop.is_set():
            return "interrupted"
        if remaining <= 0:
            return "timeout"
        stop.wait(min(0.1, remaining))
    return "interrupted" if stop.is_set() else ""


def die_with_parent():
    """Linux: if the loop itself is killed (kill -9), the kernel kills the trainer too, so no
    orphan keeps the GPU busy while the loop is restarted."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def kill_group(proc, grace=5.0):
    """SIGTERM to the trial's whole process group, SIGKILL if it lingers."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def parse_summary(lines):
    """The key: value block after the last '---' line, or {} if there is none."""
    try:
        start = len(lines) - 1 - lines[::-1].index("---")
    except ValueError:
        return {}
    summary = {}
    for line in lines[start + 1:]:
        key, sep, value = line.partition(":")
        if sep and key and not key.startswith(" "):
            summary[key.strip()] = value.strip()
    return summary


def classify(lines, returncode, error=""):
    if error:
        return Outcome(False, error, {}, returncode)
    fails = [line[6:].strip() for line in lines if line.startswith("FAIL: ")]
    if fails:
        reason, _, detail = fails[-1].partition(" ")
        if reason not in FAIL_REASONS:
            reason, detail = "error", fails[-1]
        return Outcome(False, reason if reason != "error" else f"error: {detail}".strip(), {},
                       returncode)
    summary = parse_summary(lines)
    if returncode == 0:
        missing = [k for k in SUMMARY_KEYS if k not in summary]
        if missing:
            what = "no summary block" if not summary else f"summary lacks {', '.join(missing)}"
            return Outcome(False, f"error: {what}", {}, returncode)
        try:
            values = {k: float(summary[k]) for k in SUMMARY_KEYS}
        except ValueError as e:
            return Outcome(False, f"error: unparsable summary ({e})", {}, returncode)
        if not math.isfinite(values["val_bpb"]) or values["val_bpb"] <= 0:
            return Outcome(False, "nan", {}, returncode)
        return Outcome(True, "", summary | {k: v for k, v in values.items()}, returncode)
    text = "\n".join(lines[-50:]).lower()
    if "out of memory" in text or "can't allocate memory" in text:
        return Outcome(False, "oom", {}, returncode)
    exceptions = [m.group(1) for line in lines if (m := _EXCEPTION.match(line))]
    if exceptions:
        return Outcome(False, f"error: {exceptions[-1][:300]}", {}, returncode)
    if returncode is not None and returncode < 0:
        return Outcome(False, f"error: killed by signal {-returncode}", {}, returncode)
    last = next((line for line in reversed(lines) if line.strip()), "no output")
    return Outcome(False, f"error: exit {returncode}: {last[:300]}", {}, returncode)


def progress_of(line):
    """(step, progress 0..1, loss) from a train.py progress line, else None."""
    m = _PROGRESS.match(line)
    return (int(m.group(1)), float(m.group(2)), float(m.group(3))) if m else None
