"""Run one trial: its own directory, train.py as a subprocess in its own process group (inside a
sandbox when one is given), a time limit, the log streamed live, the fixed evaluation served from
this process, the summary checked against it, failures classified."""
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

import prepare
from autoresearch import protocol, trialdir
from autoresearch.config import DATA_ENV
from autoresearch.sandbox import die_with_parent

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Nothing secret reaches the trainer: it never needs an API key, and code mode runs LLM text.
_SECRET = re.compile(r"(API_KEY|APIKEY|TOKEN|SECRET|PASSWORD)", re.I)
_fixed_evals = {}  # prepared directory -> its FixedEval: the validation rows are packed once


@dataclass
class Outcome:
    ok: bool
    error: str = ""               # crash reason: timeout, oom, nan, diverged, error: ..., interrupted
    summary: dict = field(default_factory=dict)
    returncode: int = None
    wall_seconds: float = 0.0
    log: str = ""
    pruned: bool = False          # stopped early on the judge's word (error says where and why)


def clean_env(data_dir=None, extra=None):
    env = {k: v for k, v in os.environ.items() if not _SECRET.search(k)}
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    if data_dir:
        env[DATA_ENV] = data_dir
    env.update(extra or {})
    return env


def fixed_eval(data_dir=None):
    """The fixed evaluation of a prepared dataset (default: the current one), built once."""
    data = prepare.load_prepared(data_dir)
    key = os.path.realpath(data.dir)
    if key not in _fixed_evals:
        _fixed_evals[key] = data.fixed_eval()
    return data.dir, _fixed_evals[key]


def run_trial(trial_dir, source, time_limit, data_dir=None, env=None, on_line=None, sandbox=None):
    """Write `source` as trial_dir/train.py, run it, and return an Outcome. val_bpb is the fixed
    evaluation's, served from here; the trainer's printed one must only agree with it. `sandbox`
    (autoresearch.sandbox.Sandbox, or None for none) confines the trainer. Ctrl-C (SIGINT) kills
    the trial and returns an 'interrupted' Outcome (the caller re-raises). `on_line` sees each
    output line as it comes; when it returns a non-empty string the trial is stopped there and
    the Outcome is `pruned`, with that string as its error."""
    data_dir, fixed = fixed_eval(data_dir)
    os.makedirs(trial_dir, exist_ok=True)
    script = os.path.join(trial_dir, trialdir.SOURCE)
    with open(script, "w") as f:
        f.write(source)
    log_path = os.path.join(trial_dir, trialdir.LOG)
    t0 = time.time()
    lines = []
    served = {}
    stop = threading.Event()
    prune = threading.Event()
    pruned = []
    ours, theirs = socket.socketpair()
    full_env = clean_env(data_dir, env)
    full_env[prepare.EVAL_FD_ENV] = str(theirs.fileno())
    argv = [sys.executable, "train.py"]
    previous = _catch_interrupt(stop)
    try:
        launch = sandbox.launch(argv, trial_dir, data_dir, full_env) if sandbox else None
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                launch.argv if launch else argv, cwd=trial_dir,
                env=launch.env if launch else full_env, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                text=True, errors="replace", bufsize=1,
                pass_fds=(theirs.fileno(), *(launch.pass_fds if launch else ())),
                preexec_fn=launch.preexec if launch else die_with_parent)
            theirs.close()
            if launch:
                launch.started()
            conn = Connection(os.dup(ours.fileno()))

            def pump():  # a thread, so the time limit holds even when the trainer prints nothing
                for line in proc.stdout:
                    log.write(line)
                    log.flush()
                    lines.append(line.rstrip("\n"))
                    if on_line is not None and not pruned:
                        reason = on_line(line.rstrip("\n"))
                        if reason:
                            pruned.append(reason)
                            prune.set()

            def serve():
                served["result"] = fixed.serve(conn)

            reader = threading.Thread(target=pump, daemon=True)
            server = threading.Thread(target=serve, daemon=True)
            reader.start()
            server.start()
            error = _wait(proc, time_limit, stop, prune)
            if error:
                kill_group(proc)
            report = launch.finish(proc, killed=bool(error)) if launch else None
            _kill_leftovers(proc)
            _hang_up(ours)
            server.join(timeout=10)
            conn.close()
            reader.join(timeout=10)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
        theirs.close()
        ours.close()
    if error == "interrupted":
        return Outcome(False, "interrupted", {}, proc.returncode, time.time() - t0, log_path)
    if error == "pruned":
        return Outcome(False, pruned[0], {}, proc.returncode, time.time() - t0, log_path,
                       pruned=True)
    returncode = report.returncode if report and report.returncode is not None else proc.returncode
    outcome = classify(lines, returncode, error, served.get("result"), sandbox, report)
    outcome.wall_seconds = time.time() - t0
    outcome.log = log_path
    return outcome


def _hang_up(sock):
    """Unblock the evaluation thread if it still waits on a trainer that is gone."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _catch_interrupt(stop):
    """While a trial runs, Ctrl-C only sets `stop`. A KeyboardInterrupt raised instead can land
    inside the fork that starts the trainer, where Python prints and drops it ("Exception
    ignored in ... _releaseLock"), and the loop would run on. Returns the handler to restore, or
    None outside the main thread (where no signal arrives anyway)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGINT, lambda signum, frame: stop.set())


def _wait(proc, time_limit, stop, prune=None):
    """'' when the trainer exits by itself, 'timeout' past the limit, 'interrupted' on Ctrl-C,
    'pruned' when the judge stopped it."""
    deadline = time.monotonic() + time_limit
    while proc.poll() is None:
        remaining = deadline - time.monotonic()
        if stop.is_set():
            return "interrupted"
        if prune is not None and prune.is_set():
            return "pruned"
        if remaining <= 0:
            return "timeout"
        stop.wait(min(0.02, remaining))  # the loop notices the exit within 20 ms
    return "interrupted" if stop.is_set() else ""


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


def _kill_leftovers(proc):
    """Whatever of the trial's process group outlived its first process (a child that was
    not waited for) goes, so nothing keeps the log pipe or the GPU after the trial."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def classify(lines, returncode, error="", served=None, sandbox=None, report=None):
    """The Outcome of a finished trainer: `served` is what the fixed evaluation concluded
    ({"val_bpb": x}, {"error": reason}, or None if it never completed), `report` what the
    sandbox saw (leftover processes), `sandbox` decides which refusals can be named."""
    if error:
        return Outcome(False, error, {}, returncode)
    if served and "error" in served:  # the trainer crashed on the ContractError it was told
        reason = served["error"]
        head = reason.split(":")[0]
        short = head if head in ("non-causal", "stateful") else reason
        detail = reason[len(head) + 1:].strip() if short == head else ""
        return Outcome(False, protocol.contract(short + (f" ({detail})" if detail else "")), {},
                       returncode)
    if report and report.missing:
        last = next((line for line in reversed(lines) if line.strip()), "no output")
        return Outcome(False, protocol.refused("no report from the trial's supervisor", last[:200]),
                       {}, returncode)
    if report and report.leftover and returncode == 0:  # else the trainer's own failure says more
        return Outcome(False, protocol.refused("a process outlived the trial",
                                               report.leftover[0][:200]), {}, returncode)
    fail = protocol.fail_reason(lines)
    if fail:
        return Outcome(False, fail, {}, returncode)
    summary = protocol.parse_summary(lines)
    if returncode == 0:
        missing = [k for k in protocol.SUMMARY_KEYS if k not in summary]
        if missing:
            what = "no summary block" if not summary else f"summary lacks {', '.join(missing)}"
            return Outcome(False, f"error: {what}", {}, returncode)
        try:
            values = {k: float(summary[k]) for k in protocol.SUMMARY_KEYS}
        except ValueError as e:
            return Outcome(False, f"error: unparsable summary ({e})", {}, returncode)
        broken = _disagrees(lines, values["val_bpb"], served)
        if broken:
            return Outcome(False, protocol.contract(broken), {}, returncode)
        values["val_bpb"] = served["val_bpb"]
        if not math.isfinite(values["val_bpb"]) or values["val_bpb"] <= 0:
            return Outcome(False, "nan", {}, returncode)
        return Outcome(True, "", summary | values, returncode)
    if protocol.is_oom(lines):
        return Outcome(False, "oom", {}, returncode)
    exception = protocol.last_exception(lines)
    rule = sandbox.refusal(exception, returncode) if sandbox else None
    if rule:
        return Outcome(False, rule, {}, returncode)
    if exception:
        return Outcome(False, f"error: {exception[:300]}", {}, returncode)
    if returncode is not None and returncode < 0:
        return Outcome(False, f"error: killed by signal {-returncode}", {}, returncode)
    last = next((line for line in reversed(lines) if line.strip()), "no output")
    return Outcome(False, f"error: exit {returncode}: {last[:300]}", {}, returncode)


def _disagrees(lines, printed, served):
    """Why the printed summary cannot stand next to the fixed evaluation, or None."""
    if served is None:
        return "no fixed evaluation (evaluate_bpb never completed)"
    if protocol.summary_blocks(lines) > 1:
        return "more than one summary block"
    if not math.isfinite(served["val_bpb"]):
        return None  # a diverged model: reported as nan
    if not abs(printed - served["val_bpb"]) <= 1e-6:  # the print rounds to 6 decimals
        return (f"printed val_bpb {printed:.6f} is not the fixed evaluation's "
                f"{served['val_bpb']:.6f}")
    return None
